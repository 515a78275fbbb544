"""The control file: in-place lr / weight_decay changes for a running trial.

Checked every step, so the check must cost next to nothing: one os.stat, and the file is read
only when its identity changes. The identity includes the inode because a Kubernetes ConfigMap
mount replaces the file by swapping a symlink (a new inode, possibly the same size and mtime).
"""

from __future__ import annotations

import json
import os
import sys

from pydantic import ValidationError

from trainpilot.api.trial import ControlFile, describe_validation_error


class ControlWatcher:
    def __init__(self, path: str | None, applied_generation: int = 0):
        self.path = path
        # Generations at or below this are old news; writers start counting at 1.
        self.applied_generation = applied_generation
        self._identity: tuple[int, int, int, int] | None = None

    def poll(self) -> ControlFile | None:
        """A control file with a newer generation than the last one returned, else None.

        Each generation is returned once; the caller applies it at its next step."""
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)  # follows the symlink, as the mount's readers do
        except OSError:
            return None  # not written yet (or mid-swap): nothing to apply
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if identity == self._identity:
            return None
        self._identity = identity
        try:
            with open(self.path, encoding="utf-8") as handle:
                control = ControlFile.model_validate(json.load(handle))
        except (OSError, ValueError) as error:  # json and pydantic errors are ValueErrors
            detail = describe_validation_error(error) if isinstance(error, ValidationError) else str(error)
            print(f"trainpilot: ignoring invalid control file {self.path}: {detail}", file=sys.stderr, flush=True)
            return None
        if control.generation <= self.applied_generation:
            return None
        self.applied_generation = control.generation
        return control
