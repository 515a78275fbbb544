"""Resuming a ZeRO-1/2 checkpoint at another world size, through DeepSpeed's universal checkpoint.

Such a checkpoint holds one optimizer partition per rank, which DeepSpeed loads only at the world
size that saved it. DeepSpeed's `ds_to_universal` rewrites it as one folder per parameter (weights
and Adam moments whole), which an engine configured with `checkpoint.load_universal` loads at any
world size. Rank 0 converts once, beside the checkpoint (`<tag>.universal`, written under a
temporary name and renamed whole, so a conversion cut short is never loaded); later resumes of
the same tag reuse it. The checkpoint must have been saved with the universal-checkpoint
information (Trainer.save_checkpoint adds it; config.check_resume checks the completion record).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import ConfigError

SUFFIX = ".universal"
MARKER = "trainpilot-universal.json"


def universal_tag(tag: str) -> str:
    return f"{tag}{SUFFIX}"


def convert(directory: str, tag: str, log=print, into: str | None = None) -> str:
    """The tag of `directory/tag`'s universal checkpoint, converting it first if need be (rank 0).
    It goes beside the tag, or into `into` (where a pinned copy was saved from: kept for the next
    trial that resumes it at another world size)."""
    into = into or directory
    target = Path(into) / universal_tag(tag)
    if (target / MARKER).is_file():
        return target.name
    temporary = Path(into) / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    started = time.monotonic()
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    command += ["--input_folder", str(Path(directory) / tag), "--output_folder", str(temporary)]
    command += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 - our own argv
    if done.returncode != 0:
        shutil.rmtree(temporary, ignore_errors=True)
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        raise ConfigError(
            f"resume_from: {into}/{tag} could not be converted to a universal checkpoint to resume at "
            f"another world size ({last.strip()[:300]}); resume at the world size that saved it"
        )
    (temporary / MARKER).write_text(json.dumps({"from": tag}), encoding="utf-8")
    try:
        os.replace(temporary, target)
    except OSError:  # another trial converted the same tag meanwhile: theirs is as good
        shutil.rmtree(temporary, ignore_errors=True)
    log(f"converted {into}/{tag} to a universal checkpoint in {time.monotonic() - started:.1f} s", flush=True)
    return target.name
