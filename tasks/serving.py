"""Model servers for eval: OpenAI-compatible endpoints started on 127.0.0.1, on a free port.

- `transformers_serve`: `transformers serve` (CPU works), started without a pinned model: it loads
  each model on the first request naming its directory, so one start-up answers for both the base
  and the tuned (merged) model.
- `vllm_serve`: vLLM with the base model and the LoRA adapter (`--enable-lora`), on a CUDA GPU;
  the base model is requested as `base`, the adapter as `tuned`. Without vLLM or CUDA it raises
  `EndpointUnavailableError` naming the fix, before anything starts.

Each server is a child process in its own process group whose output goes to a log file; start-up
waits for `/health` up to a timeout (`ServerError` with the log's end otherwise), and the server is
always stopped, also when the stage fails or is interrupted, so a crashed eval never leaves a
server holding memory and a port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import ServiceError

VLLM_BASE_NAME = "base"
VLLM_TUNED_NAME = "tuned"
# vLLM accepts only these values for --max-lora-rank; the smallest one >= the adapter's rank is used.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class ServerError(ServiceError):
    """The model server did not become ready; the message carries the end of its log."""


class EndpointUnavailableError(ServiceError):
    """The endpoint asked for cannot run on this machine; the message says what to install or set."""


def console_script(name: str) -> str:
    """The `name` command of this environment: next to this Python (a venv), else on the PATH (a
    venv layered over an image's packages, a `--target` install)."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    # Not installed at all: the path next to this Python, so starting it fails naming that path.
    return shutil.which(name) or str(beside)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def managed_server(command: list[str], port: int, log_path: Path, startup_timeout: float, what: str = "model server") -> Iterator[str]:
    """Starts `command` (which must listen on `port`), waits for `/health`, yields the base URL
    `http://127.0.0.1:PORT/v1`, and stops the process group on the way out, whatever happens.

    On a host with GPUs the server holds one of them for this job while it runs (`tasks/gpu_allocator.py`),
    waiting while other jobs hold them all, and sees only that one."""
    from tasks.gpu_allocator import acquire, host_devices

    devices = host_devices()
    with acquire(1 if devices else 0, devices=devices, job=what) as lease:
        environment = {**os.environ, **lease.environment(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        try:
            _wait_until_healthy(process, f"http://127.0.0.1:{port}/health", startup_timeout, log_path, what)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop_process_group(process)


def transformers_serve(log_path: Path, startup_timeout: float) -> contextlib.AbstractContextManager[str]:
    """`transformers serve`; request `model` = the absolute directory of a model."""
    port = free_port()
    command = [
        console_script("transformers"), "serve",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu" if not _has_cuda() else "auto",
        "--log-level", "warning",
    ]
    return managed_server(command, port, log_path, startup_timeout, "transformers serve")


def vllm_command(base_model: str, adapter_dir: Path, port: int, lora_rank: int) -> list[str]:
    max_rank = next((rank for rank in VLLM_LORA_RANKS if rank >= lora_rank), lora_rank)
    return [
        console_script("vllm"), "serve", base_model,
        "--served-model-name", VLLM_BASE_NAME,
        "--enable-lora", "--lora-modules", f"{VLLM_TUNED_NAME}={adapter_dir}", "--max-lora-rank", str(max_rank),
        "--host", "127.0.0.1", "--port", str(port),
    ]


def check_vllm_available() -> None:
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("vLLM is not installed (install the `gpu` extra: pip install 'loraflow[gpu]')")
    if not _has_cuda():
        problems.append("no CUDA GPU is visible (vLLM serves LoRA adapters on GPUs only)")
    if problems:
        raise EndpointUnavailableError(
            "`eval.endpoint: vllm` cannot start: " + "; ".join(problems)
            + ". Use `eval.endpoint: local` (transformers serve, works on CPU) on this machine."
        )


def vllm_serve(
    base_model: str, adapter_dir: Path, lora_rank: int, log_path: Path, startup_timeout: float
) -> contextlib.AbstractContextManager[str]:
    """vLLM with the base model (requested as `base`) and the adapter (requested as `tuned`)."""
    check_vllm_available()
    port = free_port()
    return managed_server(vllm_command(base_model, adapter_dir, port, lora_rank), port, log_path, startup_timeout, "vLLM")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wait_until_healthy(process: subprocess.Popen, health_url: str, timeout: float, log_path: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with code {process.returncode} before it was ready (log: {log_path}):\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise ServerError(
        f"{what} not ready after {timeout:g} s (raise eval.startup_timeout if the model is large; "
        f"log: {log_path}):\n{_tail(log_path)}"
    )


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (a server may have started workers), SIGKILL after 10 s."""
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


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether something accepts connections at the URL's host and port (a hub, a tracking server)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
