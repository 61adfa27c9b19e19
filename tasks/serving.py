"""A local OpenAI-compatible endpoint: `transformers serve` on 127.0.0.1, on a free port.

The server is started without a pinned model: it loads each model on the first request naming its
directory, so one server (one start-up) answers for both the base and the tuned model.

The server is a child process in its own process group; it is always stopped, also when the stage
fails or is interrupted, so a crashed eval never leaves a server holding memory and a port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


class ServerError(RuntimeError):
    """The local model server did not become ready; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(log_path: Path, startup_timeout: float) -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT/v1`); request `model` = a model directory."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu" if not _has_cuda() else "auto",
        "--log-level", "warning",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    try:
        _wait_until_healthy(process, f"http://127.0.0.1:{port}/health", startup_timeout, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wait_until_healthy(process: subprocess.Popen, health_url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"model server exited with code {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise ServerError(
        f"model server not ready after {timeout:.0f} s (raise eval.startup_timeout if the model is "
        f"large):\n{_tail(log_path)}"
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"
