"""The NVIDIA GPUs this process may use, asked of nvidia-smi (never of torch, so config checks stay fast).

Kept apart from everything else so that the config, the memory estimate and the process plan can
all ask without importing one another.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_gb: float
    compute_capability: float


def visible_gpus() -> list[GpuInfo]:
    """NVIDIA GPUs this process may use (honouring CUDA_VISIBLE_DEVICES), from nvidia-smi; [] without one.

    Asked once per process and CUDA_VISIBLE_DEVICES value: keys, preflight, the process plan and the
    memory estimate all need it, and nvidia-smi takes a fraction of a second each time."""
    return list(_visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES")))


@functools.lru_cache(maxsize=8)
def _visible_gpus(visible: str | None) -> tuple[GpuInfo, ...]:
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in listing.strip().splitlines():
        index, name, memory_mib, capability = (part.strip() for part in line.split(","))
        gpus.append(GpuInfo(int(index), name, float(memory_mib) * 2**20 / 1e9, float(capability)))
    if visible is not None:
        wanted = [int(part) for part in visible.split(",") if part.strip().isdigit()]
        gpus = [gpu for gpu in gpus if gpu.index in wanted]
    return tuple(gpus)
