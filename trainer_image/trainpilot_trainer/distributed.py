"""Process-group setup: under torchrun (RANK & co. in the environment) or alone.

Alone, the trainer still starts a one-rank process group, because deepspeed.initialize needs
one; it binds to 127.0.0.1 on a free port, so no network (and no DNS) is involved.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_environment(env: os._Environ | dict = os.environ) -> DistEnv:
    """Fill in a single-process world when no launcher did; returns this process's place in it."""
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    missing = [name for name in LAUNCHER_VARIABLES if name not in env]
    if missing:
        raise RuntimeError(f"RANK is set but {', '.join(missing)} is not: start the trainer with torchrun")
    return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]))


def set_accelerator_env(cuda_available: bool, env: os._Environ | dict = os.environ) -> None:
    """DeepSpeed picks its accelerator at import time; say "cpu" before it looks for one."""
    if not cuda_available:
        env.setdefault("DS_ACCELERATOR", "cpu")
