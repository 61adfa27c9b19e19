"""GPUs shared between jobs on one host: each job holds its own devices while it trains or serves.

Several pipelines on one machine (`loraflow run A.yaml B.yaml --max-parallel 2`, two `loraflow run`
processes, a Prefect worker running two flow runs, Ray tasks on one node) would otherwise each
start one training process per visible GPU and fight over every one of them. Here a job asks for
the number of devices it plans to use and gets that many for itself, or waits until they are free.

How: one lock file per device, `<lock dir>/gpu-<index>.lock`, held with `fcntl.flock` by the job
that uses the device. The kernel drops a flock when its holder's last file descriptor closes, so a
job that crashes or is SIGKILLed frees its devices at once: no stale lease to clean up. The lock
directory must be local to the host (flock on a network filesystem may be shared across hosts or
not work at all): `LORAFLOW_GPU_LOCK_DIR`, by default `/tmp/loraflow-gpus-<uid>` (one user's jobs
share; point every user at one directory writable by all on a shared workstation).

What a caller can rely on:
- `acquire(count)` returns a `GpuLease` of `count` devices no other lease holds, trying the free
  devices in index order; it never holds some devices while waiting for others (no two waiting jobs
  can block each other). While it waits it logs what it waits for and who holds the devices.
- Asking for more devices than the host has raises `GpuAllocationError` at once (it could never be
  satisfied); so does a wait past `timeout` seconds.
- `lease.environment()` is what a child process needs to see only its devices
  (`CUDA_VISIBLE_DEVICES`, with `CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA numbers devices as
  nvidia-smi does). The devices are free again when the lease is released (`with` block) or its
  process dies.
- The host's devices are those nvidia-smi lists that this process may use (honouring
  `CUDA_VISIBLE_DEVICES`, e.g. as Ray or Kubernetes set it). `LORAFLOW_FAKE_GPUS=N` replaces them
  with N device indices (0..N-1) for tests on a machine without GPUs; only the allocator reads it,
  and everything else (the lock files, the waiting, CUDA_VISIBLE_DEVICES) stays the real thing.

Plain module (no Prefect, no torch): a stage run by any scheduler can use it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tasks.errors import ConfigFamilyError, ServiceError
from tasks.gpus import visible_gpus

log = logging.getLogger("loraflow.gpus")

LOCK_DIR_ENV = "LORAFLOW_GPU_LOCK_DIR"
FAKE_GPUS_ENV = "LORAFLOW_FAKE_GPUS"
_POLL_SECONDS = 0.5


class GpuAllocationError(ConfigFamilyError):
    """More GPUs were asked for than this host has: the job could never start."""


class GpuWaitTimeoutError(ServiceError):
    """The GPUs a job asked for did not become free in time."""


def host_devices() -> list[int]:
    """The device indices jobs on this host share: nvidia-smi's (as this process may see them), or
    0..N-1 with LORAFLOW_FAKE_GPUS=N."""
    fake = os.environ.get(FAKE_GPUS_ENV, "").strip()
    if fake:
        if not fake.isdigit():
            raise GpuAllocationError(f"{FAKE_GPUS_ENV}={fake!r}: give a number of simulated GPUs, e.g. {FAKE_GPUS_ENV}=4")
        return list(range(int(fake)))
    return [gpu.index for gpu in visible_gpus()]


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or f"/tmp/loraflow-gpus-{os.getuid()}")


@dataclass
class GpuLease:
    """Devices held by this process until `release()` (or the end of a `with` block, or its death)."""

    devices: tuple[int, ...]
    _handles: list[IO[str]] = field(default_factory=list, repr=False)

    def environment(self) -> dict[str, str]:
        """Environment for a child process that must use exactly these devices (none: nothing to set)."""
        if not self.devices:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(device) for device in self.devices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def release(self) -> None:
        for handle in self._handles:
            handle.close()  # closing the descriptor drops its flock
        self._handles.clear()

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(
    count: int, *, devices: Sequence[int] | None = None, job: str = "", timeout: float | None = None,
    directory: Path | None = None,
) -> GpuLease:
    """`count` devices of `devices` (default: `host_devices()`) for this job alone; waits while fewer are free.

    `job` names the holder in the lock files, so a waiting job can say whom it waits for. `timeout`
    (seconds, None: no limit) bounds the wait. Raises GpuAllocationError when `count` exceeds the
    host's devices, GpuWaitTimeoutError after `timeout`."""
    pool = list(host_devices() if devices is None else devices)
    if count <= 0:
        return GpuLease(())
    if count > len(pool):
        raise GpuAllocationError(
            f"{job or 'this job'} needs {count} GPU(s) but this host has {len(pool)} ({_names(pool)}); "
            "lower `num_processes` (or run it on a host with more GPUs)"
        )
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    started, announced = time.monotonic(), False
    while True:
        lease = _try_acquire(count, pool, directory, job)
        if lease is not None:
            if announced:
                log.info("gpus: %s got GPU(s) %s after %.0f s", job or "job", _names(lease.devices), time.monotonic() - started)
            return lease
        if timeout is not None and time.monotonic() - started > timeout:
            raise GpuWaitTimeoutError(
                f"{job or 'this job'} waited {timeout:g} s for {count} free GPU(s) of {_names(pool)}; held: {holders(pool, directory)}"
            )
        if not announced:
            log.info("gpus: %s waits for %d free GPU(s) of %s; held now: %s", job or "job", count, _names(pool), holders(pool, directory))
            announced = True
        time.sleep(_POLL_SECONDS)


def _try_acquire(count: int, pool: list[int], directory: Path, job: str) -> GpuLease | None:
    """`count` free devices, or None (holding nothing) when fewer are free."""
    lease = GpuLease(())
    held: list[int] = []
    for device in pool:
        handle = (directory / f"gpu-{device}.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        # Who holds it, for the log line of a job that waits (read without the lock: advisory only).
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}" + (f" ({job})" if job else ""))
        handle.flush()
        lease._handles.append(handle)
        held.append(device)
        if len(held) == count:
            lease.devices = tuple(held)
            return lease
    lease.release()
    return None


def holders(pool: Sequence[int], directory: Path | None = None) -> str:
    """Which process holds each busy device, as the lock files say."""
    directory = directory or lock_dir()
    busy = []
    for device in pool:
        path = directory / f"gpu-{device}.lock"
        try:
            with path.open("a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: we got it, and close drops it
            continue
        except BlockingIOError:
            busy.append(f"GPU {device} by {path.read_text().strip() or 'another process'}")
        except OSError:
            continue
    return ", ".join(busy) or "none"


def _names(devices: Sequence[int]) -> str:
    return "GPU " + ",".join(str(device) for device in devices) if devices else "no GPU"
