"""The GPU allocator across real processes, on 4 simulated devices (LORAFLOW_FAKE_GPUS=4).

Each job is a separate Python process that acquires its GPUs through `tasks.gpu_allocator`,
prints them, and holds them until told to finish (a line on stdin) or killed: two jobs of 2 get
disjoint devices, a third waits (and says so) until one finishes, a SIGKILLed holder frees its
devices, and a job that asks for more than the host has fails at once.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.gpu_allocator import FAKE_GPUS_ENV, LOCK_DIR_ENV, GpuAllocationError, GpuWaitTimeoutError, acquire, host_devices

REPO = Path(__file__).resolve().parents[1]
# A job: holds `count` GPUs, prints them as JSON, releases them when a line arrives on stdin.
JOB = """
import json, logging, sys
from tasks.gpu_allocator import acquire
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
with acquire(int(sys.argv[1]), job=sys.argv[2]) as lease:
    print(json.dumps({"devices": lease.devices, "env": lease.environment()}), flush=True)
    sys.stdin.readline()
"""


class Job:
    def __init__(self, name: str, count: int, lock_dir: Path) -> None:
        self.name = name
        self.stderr_path = lock_dir.parent / f"{name}.stderr"
        self.process = subprocess.Popen(
            [sys.executable, "-c", JOB, str(count), name], cwd=REPO, text=True,
            env={**os.environ, FAKE_GPUS_ENV: "4", LOCK_DIR_ENV: str(lock_dir), "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_path.open("w"),
        )

    def devices(self, timeout: float) -> tuple[int, ...] | None:
        """The devices the job got, or None if it still has none after `timeout` seconds."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        assert line, f"{self.name} ended without GPUs: {self.stderr_path.read_text()}"
        got = json.loads(line)
        assert got["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, got["devices"]))
        return tuple(got["devices"])

    def finish(self) -> None:
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=30) == 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def lock_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(directory))
    monkeypatch.setenv(FAKE_GPUS_ENV, "4")
    return directory


def test_jobs_in_separate_processes_get_disjoint_gpus_wait_for_them_and_get_them_back_from_a_killed_holder(lock_dir):
    jobs: list[Job] = []
    try:
        first, second = Job("first", 2, lock_dir), Job("second", 2, lock_dir)
        jobs += [first, second]
        first_devices, second_devices = first.devices(60), second.devices(60)
        assert first_devices and second_devices
        assert set(first_devices).isdisjoint(second_devices) and set(first_devices) | set(second_devices) == {0, 1, 2, 3}

        # No GPU is free: the third job waits, and says for what and for whom.
        third = Job("third", 2, lock_dir)
        jobs.append(third)
        assert third.devices(3) is None
        waiting = third.stderr_path.read_text()
        assert "gpus: third waits for 2 free GPU(s) of GPU 0,1,2,3; held now:" in waiting
        assert "(first)" in waiting and "(second)" in waiting

        first.finish()
        assert third.devices(30) == first_devices

        # A holder that dies without releasing anything frees its devices all the same.
        fourth = Job("fourth", 2, lock_dir)
        jobs.append(fourth)
        assert fourth.devices(2) is None
        os.kill(second.process.pid, signal.SIGKILL)
        assert fourth.devices(30) == second_devices
    finally:
        for job in jobs:
            job.stop()


def test_asking_for_more_gpus_than_the_host_has_fails_at_once(lock_dir):
    started = time.monotonic()
    with pytest.raises(GpuAllocationError, match=r"run-a needs 5 GPU\(s\) but this host has 4 \(GPU 0,1,2,3\); lower `num_processes`"):
        acquire(5, job="run-a")
    assert time.monotonic() - started < 1


def test_a_wait_past_its_timeout_fails_naming_the_holders(lock_dir):
    with acquire(3, job="big") as held:
        assert held.devices == (0, 1, 2)
        with acquire(1, job="small") as small:  # one is still free (in the same process too)
            assert small.devices == (3,)
            with pytest.raises(GpuWaitTimeoutError, match=r"waited 1 s for 1 free GPU.*GPU 0 by pid \d+ \(big\)"):
                acquire(1, job="late", timeout=1)
    with acquire(4) as everything:  # all released
        assert everything.devices == (0, 1, 2, 3)


def test_simulated_devices_and_no_devices(monkeypatch, lock_dir):
    assert host_devices() == [0, 1, 2, 3]
    monkeypatch.setenv(FAKE_GPUS_ENV, "four")
    with pytest.raises(GpuAllocationError, match="LORAFLOW_FAKE_GPUS='four'"):
        host_devices()
    # A CPU job asks for no GPU and gets an empty lease, which sets nothing.
    assert acquire(0, devices=[]).environment() == {}


def test_a_model_server_holds_a_gpu_while_it_runs_and_sees_only_that_one(lock_dir, tmp_path):
    from tasks.serving import free_port, managed_server
    from tests.test_eval_serving import running_with, server_command

    with acquire(3, job="training") as training:
        assert training.devices == (0, 1, 2)
        port = free_port()
        with managed_server(server_command(port), port, tmp_path / "server.log", startup_timeout=30, what="eval server"):
            (pid,) = running_with(f"--port {port}")
            environment = dict(
                item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item
            )
            assert environment["CUDA_VISIBLE_DEVICES"] == "3"
            with pytest.raises(GpuWaitTimeoutError, match=r"GPU 3 by pid \d+ \(eval server\)"):
                acquire(1, job="another", timeout=0.5)
    with acquire(4) as everything:  # the server's GPU came back when it stopped
        assert everything.devices == (0, 1, 2, 3)
