"""Eval's server lifecycle with a real server process (tests/eval_fault_server.py run as a program):
readiness, the captured log, a timeout or an early exit reported with the log's end, and the
process always stopped, also when the code using it fails. And the vLLM endpoint: its launch
command, and a clear error where vLLM or CUDA is missing."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tasks.serving import (
    EndpointUnavailableError,
    ServerError,
    check_vllm_available,
    free_port,
    managed_server,
    vllm_command,
)

SERVER_SCRIPT = Path(__file__).with_name("eval_fault_server.py")


def server_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(SERVER_SCRIPT), "--port", str(port), *extra]


def running_with(marker: str) -> list[int]:
    """Pids of live processes whose command line holds `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                if (proc / "stat").read_text().split()[2] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_server_is_ready_logged_and_stopped_when_the_caller_fails(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="eval failed half-way"):
        with managed_server(server_command(port), port, log_path, startup_timeout=30, what="test server") as base_url:
            assert base_url == f"http://127.0.0.1:{port}/v1"
            reply = OpenAI(base_url=base_url, api_key="k").chat.completions.create(
                model="tuned", messages=[{"role": "user", "content": "say positive"}]
            )
            assert reply.choices[0].message.content == "positive"
            raise RuntimeError("eval failed half-way")
    assert not listening(port) and not running_with(f"--port {port}")
    assert "fault server listening" in log_path.read_text()


def test_startup_timeout_names_the_setting_shows_the_log_and_stops_the_server(tmp_path):
    port = free_port()
    with pytest.raises(ServerError) as caught:
        with managed_server(server_command(port, "--startup-delay", "60"), port, tmp_path / "server.log", startup_timeout=1.5):
            pytest.fail("a server that is not ready must not be used")
    message = str(caught.value)
    assert "not ready after 1.5 s" in message and "eval.startup_timeout" in message
    assert "fault server starting" in message  # the end of its log
    assert not running_with(f"--port {port}")


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('CUDA out of memory', flush=True); sys.exit(3)"]
    with pytest.raises(ServerError, match=r"(?s)exited with code 3.*CUDA out of memory"):
        with managed_server(command, free_port(), tmp_path / "server.log", startup_timeout=30):
            pass


def test_vllm_command_serves_base_and_adapter(tmp_path):
    command = vllm_command("/models/llama", tmp_path / "adapter", 8123, lora_rank=12)
    assert command[1:3] == ["serve", "/models/llama"]
    assert command[command.index("--lora-modules") + 1] == f"tuned={tmp_path / 'adapter'}"
    assert "--enable-lora" in command and command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--served-model-name") + 1] == "base"
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "8123"


def test_vllm_endpoint_without_vllm_or_cuda_says_what_to_do():
    import torch

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and CUDA are both here: the error path cannot be reached")
    with pytest.raises(EndpointUnavailableError) as caught:
        check_vllm_available()
    message = str(caught.value)
    assert "eval.endpoint: vllm" in message and "eval.endpoint: local" in message
    if importlib.util.find_spec("vllm") is None:
        assert "pip install 'loraflow[gpu]'" in message
