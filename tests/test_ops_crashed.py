"""A pipeline run whose process is killed (SIGKILL: no `finally:`, no Prefect hook) becomes Crashed
on a real Prefect server started with `loraflow server`, and the config's `crashed` alert reaches a
webhook on 127.0.0.1: flow-run heartbeats, the zombie automation and the per-config alert
automation of tasks/zombies.py, all judged by the server after the process is gone.

Its length is set by Prefect: heartbeats every 30 s at the quickest, a window of three of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tasks.config import RunConfig
from tasks.serving import free_port
from tasks.zombies import HEARTBEAT_SECONDS, ZOMBIE_AUTOMATION, ZOMBIE_WINDOW_SECONDS, alert_body_template, crash_alert_name
from tests.faults.harness import BIN, REPO, kill_group, metrics_lines, start_run, subprocess_env, write_small_config
from tests.test_gate_and_alerts import Receiver
from tests.test_ops_server import api, latest_flow_run, loraflow

# The triggers service evaluates proactive triggers every few seconds; a busy machine adds some.
SLACK_S = 45


def test_the_alert_body_renders_as_notify_json():
    """The server-side template gives the same JSON keys as tasks/notify.py, whatever the names hold."""
    from prefect.server.events.actions import CallWebhook
    from prefect.server.utilities.user_templates import render_user_template

    cfg = RunConfig.model_validate({"name": 'odd {{ name }} "quoted"', "base_model": "m", "datasets": [{"path": "d.jsonl"}]})
    template = alert_body_template(cfg)
    CallWebhook.validate_template(template, "payload")

    class State:
        name, message = "Crashed", 'no heartbeat for 90 s: "killed" <or lost>'

    class FlowRun:
        name, id, state = "odd-2026-01-01-0200", "0f6c7a1e-0000-4000-8000-000000000000", State()

    class Event:
        occurred = datetime(2026, 1, 1, 2, 0, 5, tzinfo=timezone.utc)

    body = json.loads(asyncio.run(render_user_template(template, {"flow_run": FlowRun(), "event": Event()})))
    # The UI address is whatever Prefect's settings say in this process (other tests set one).
    ui_url = body.pop("ui_url")
    assert ui_url is None or isinstance(ui_url, str)
    assert body == {
        "event": "crashed", "config": 'odd {{ name }} "quoted"', "run": "odd-2026-01-01-0200", "flow_run_id": FlowRun.id,
        "stage": None, "state": "Crashed", "reason": State.message, "metrics": {}, "sent_at": "2026-01-01T02:00:05+00:00",
    }


@pytest.mark.e2e
def test_killed_run_becomes_crashed_and_the_crashed_alert_goes_out(tiny_model_dir, tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**subprocess_env(home), "PREFECT_API_URL": api_url, "LORAFLOW_HOME": str(REPO)}
    with (home / "server.log").open("ab") as log:
        server = subprocess.Popen([str(BIN / "loraflow"), "server", "--port", str(port)], cwd=REPO, env=subprocess_env(home),
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = None
    try:
        with Receiver() as receiver:
            # `loraflow server` creates the zombie automation once the server is healthy.
            wait_for(lambda: healthy(api_url), 180, "a healthy server", server, home / "server.log")
            wait_for(lambda: api(env, lambda: automations(ZOMBIE_AUTOMATION)), 180, "the zombie automation", server, home / "server.log")

            config = write_small_config(
                tmp_path / "run", tiny_model_dir, "http://127.0.0.1:9/v1", config_file="crashy.yaml",
                max_steps=100_000, save_steps=100_000,  # still training when killed
                notify={"events": ["crashed"], "webhook": {"url": receiver.url}},
            )
            run = start_run(config, env, tmp_path / "run.log")
            # The run sets up its alert automation before the flow starts.
            wait_for(lambda: api(env, lambda: automations(crash_alert_name("config:crashy"))), 120, "the crashed-alert automation",
                     run, tmp_path / "run.log")
            flow_run = wait_for(lambda: running_flow_run(env), 120, "a running flow run", run, tmp_path / "run.log")
            # Two heartbeats seen by the server (the first one arms the automation), and training under way.
            wait_for(lambda: heartbeats(env, flow_run.id) >= 2 and metrics_lines(1)(tmp_path / "run", 0), 3 * HEARTBEAT_SECONDS,
                     "two heartbeats and a training step", run, tmp_path / "run.log")
            assert api(env, lambda: read_flow_run(flow_run.id)).state_name == "Running"

            kill_group(run)  # SIGKILL: nothing of the run says goodbye
            killed_at = time.monotonic()
            crashed = wait_for(lambda: (fr := api(env, lambda: read_flow_run(flow_run.id))).state_name == "Crashed" and fr,
                               ZOMBIE_WINDOW_SECONDS + SLACK_S, "the Crashed state", server, home / "server.log")
            crashed_after_s = time.monotonic() - killed_at
            assert f"no heartbeat for {ZOMBIE_WINDOW_SECONDS} s" in crashed.state.message
            wait_for(lambda: receiver.bodies, 30, "the crashed message", server, home / "server.log")
            print(f"Crashed {crashed_after_s:.0f} s after the kill (window {ZOMBIE_WINDOW_SECONDS} s)")

        [body] = receiver.bodies
        assert {key: body[key] for key in ("event", "config", "run", "flow_run_id", "stage", "state")} == {
            "event": "crashed", "config": "crashy", "run": flow_run.name, "flow_run_id": str(flow_run.id),
            "stage": None, "state": "Crashed",
        }
        assert "killed" in body["reason"] and body["sent_at"]

        history = loraflow(env, "runs", "--json")
        assert history.returncode == 0, history.stderr
        assert {row["name"]: row["state"] for row in json.loads(history.stdout)}[flow_run.name] == "Crashed"

        # SIGTERM to `loraflow server` stops the Prefect server it started.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) is not None
        wait_for(lambda: not group_alive(server.pid), 30, "the Prefect server to stop", None, home / "server.log")
    finally:
        if run is not None:
            kill_group(run)
        kill_group(server)


def wait_for(check, timeout: float, what: str, process: subprocess.Popen | None, log: Path):
    """The first truthy value of `check()`; fails naming `what` when `timeout` passes or `process` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"no {what} within {timeout:g} s (process exit code {process and process.poll()}):\n{log.read_text()[-4000:]}")


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


async def automations(name: str) -> list:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_automations_by_name(name)


async def read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


def running_flow_run(env: dict):
    try:
        flow_run = api(env, lambda: latest_flow_run("crashy-"))
    except (StopIteration, RuntimeError):  # none yet (a StopIteration leaving a coroutine is a RuntimeError)
        return None
    return flow_run if flow_run.state_name == "Running" else None


def heartbeats(env: dict, flow_run_id) -> int:
    async def count() -> int:
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        async with get_client() as client:
            page = await client.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                                        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=10)
        return page.total

    return api(env, count)
