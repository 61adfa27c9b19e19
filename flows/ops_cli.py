"""Day-to-day operations: a local Prefect server, the nightly deployment, and run history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tasks.config import RunConfig

console = Console()
REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
FLOW_NAME = "loraflow-pipeline"
WORK_POOL = "loraflow-process"
GPU_LIMIT_TAG = "gpu"


def _prefect_command() -> str:
    from tasks.serving import console_script

    return console_script("prefect")


def server(port: int = typer.Option(4200, help="Port on 127.0.0.1.")) -> None:
    """Start a local Prefect server (SQLite, 127.0.0.1 only, analytics off) for the UI, with the
    automation that marks killed pipeline runs Crashed."""
    url = f"http://127.0.0.1:{port}"
    console.print(f"Prefect UI: {url}")
    console.print(f"Point runs at it:  export PREFECT_API_URL={url}/api")
    command, environment = server_command(port)
    process = subprocess.Popen(command, env=environment)
    # A SIGTERM to this process (a service manager stopping it) stops the server too.
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        if _wait_until_healthy(f"{url}/api/health", process):
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
                _ensure_zombie_automation()
        returncode = process.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group): let it stop
        returncode = process.wait()
    raise typer.Exit(returncode)


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` on 127.0.0.1 only (never all interfaces), analytics off (no network
    here; it also avoids SQLite locks), the UI pointed at this API."""
    url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"{url}/api"}
    return [_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], environment


def _wait_until_healthy(health_url: str, process: subprocess.Popen, timeout: float = 300) -> bool:
    """True once the server answers; False when it exited or stayed silent for `timeout` s."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    if process.poll() is None:
        console.print(f"warning: the server did not answer {health_url} within {timeout:g} s: the zombie-run automation was not set up")
    return False


def _ensure_zombie_automation(announce_unchanged: bool = True) -> None:
    from tasks.zombies import ZOMBIE_AUTOMATION, ZOMBIE_WINDOW_SECONDS, ensure_zombie_automation

    try:
        outcome = ensure_zombie_automation()
    except Exception as error:  # the server stays useful without it; say what is missing
        console.print(f"warning: the automation {ZOMBIE_AUTOMATION!r} could not be set up ({type(error).__name__}: {error})")
        return
    if announce_unchanged or outcome != "unchanged":
        console.print(f"automation {ZOMBIE_AUTOMATION!r} {outcome}: a pipeline run silent for {ZOMBIE_WINDOW_SECONDS} s becomes Crashed")


def set_up_crash_alert(cfg: RunConfig, config_path: Path | str) -> None:
    """Before a run (or a deployment) of a config whose `notify.events` has `crashed`: the server's
    automations that send that alert when the run's process is gone (tasks/zombies.py). Only a
    Prefect server outlives a killed run; an alert that cannot be set up never stops the run."""
    from prefect.settings import PREFECT_API_URL

    from tasks.zombies import run_tag, sync_crash_alert

    picked = cfg.notify is not None and "crashed" in cfg.notify.events
    if not PREFECT_API_URL.value():
        if picked:
            console.print("note: `crashed` alerts are sent by a Prefect server: set PREFECT_API_URL (see `loraflow server`)")
        return
    try:
        if picked:
            _ensure_zombie_automation(announce_unchanged=False)
        for line in sync_crash_alert(cfg, run_tag(config_path)):
            console.print(line)
    except Exception as error:
        if picked:  # otherwise this was only the removal of a stale alert: the run will say if the server is down
            console.print(f"warning: `crashed` alerts for {config_path} could not be set up ({type(error).__name__}: {error})")


def serve(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    cron: str | None = typer.Option(None, help="Schedule (cron); default: the config's `schedule.cron`."),
) -> None:
    """Serve the pipeline for CONFIG on the config's `schedule:` (cron and timezone) from this process,
    without a work pool."""
    from prefect.schedules import Cron

    from flows.pipeline import checked_config, pipeline
    from tasks.zombies import run_tag

    cfg = checked_config(config)
    schedule = cfg.schedule
    set_up_crash_alert(cfg, config)
    console.print(f"serving {config} on `{cron or schedule.cron}` ({schedule.timezone})")
    pipeline.serve(
        name=f"{config.stem}-served", schedules=[Cron(cron or schedule.cron, timezone=schedule.timezone)],
        parameters={"config_path": str(config)}, global_limit=1, tags=[run_tag(config), "loraflow"],
    )


def deploy(prefect_file: Path = typer.Option(PREFECT_FILE, help="Deployment definitions.")) -> None:
    """Register the deployments of deployments/prefect.yaml (with their work pool and the `gpu`
    concurrency limit) on the Prefect server named by PREFECT_API_URL."""
    if not os.environ.get("PREFECT_API_URL"):
        console.print("PREFECT_API_URL is not set: start `loraflow server` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
        raise typer.Exit(2)
    asyncio.run(_ensure_pool_and_limit())
    _ensure_zombie_automation()
    command = [_prefect_command(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    returncode = subprocess.call(command, cwd=REPO)
    if returncode == 0:
        for name, cron, timezone in asyncio.run(_apply_config_schedules(prefect_file)):
            console.print(f"{name}: scheduled `{cron}` ({timezone}) from its config's `schedule:`")
        _set_up_deployment_crash_alerts(prefect_file)
    raise typer.Exit(returncode)


def _set_up_deployment_crash_alerts(prefect_file: Path) -> None:
    """The `crashed` alert of each deployed config (its runs carry the `config:<name>` tag set in
    prefect.yaml); a webhook's `url_env` is read from this command's environment."""
    import yaml

    from tasks.config_load import load_config

    for definition in yaml.safe_load(prefect_file.read_text()).get("deployments", []):
        if config_path := (definition.get("parameters") or {}).get("config_path"):
            set_up_crash_alert(load_config(REPO / config_path), config_path)


async def _apply_config_schedules(prefect_file: Path) -> list[tuple[str, str, str]]:
    """Each deployment runs on the `schedule:` of the config it runs (cron and timezone), so the
    schedule lives in one place, next to the rest of the run's settings."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    from tasks.config_load import load_config

    applied = []
    definitions = yaml.safe_load(prefect_file.read_text())
    async with get_client() as client:
        for definition in definitions.get("deployments", []):
            config_path = (definition.get("parameters") or {}).get("config_path")
            if not config_path:
                continue
            schedule = load_config(REPO / config_path).schedule
            deployment = await client.read_deployment_by_name(f"{FLOW_NAME}/{definition['name']}")
            for existing in await client.read_deployment_schedules(deployment.id):
                await client.delete_deployment_schedule(deployment.id, existing.id)
            await client.create_deployment_schedules(deployment.id, [(CronSchedule(cron=schedule.cron, timezone=schedule.timezone), True)])
            applied.append((definition["name"], schedule.cron, schedule.timezone))
    return applied


async def _ensure_pool_and_limit() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        limits = await client.read_concurrency_limits(limit=200, offset=0)
        if not any(limit.tag == GPU_LIMIT_TAG for limit in limits):
            await client.create_concurrency_limit(tag=GPU_LIMIT_TAG, concurrency_limit=1)


def runs(
    limit: int = typer.Option(10, help="How many recent runs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Recent pipeline runs with their state, duration and key metrics, from the Prefect API."""
    rows = asyncio.run(recent_runs(limit))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="recent loraflow runs")
    for column in ("flow run", "state", "started", "duration", "key metrics"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["state"], row["started"], f"{row['duration_s']:.0f} s", row["metrics"])
    console.print(table)


async def recent_runs(limit: int) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        flow_runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
        rows = []
        for run in flow_runs:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            summary = next((a for a in artifacts if a.key and a.key.endswith("-run-summary")), None)
            rows.append({
                "id": str(run.id),
                "name": run.name,
                "state": run.state_name or "",
                "started": run.start_time.strftime("%Y-%m-%d %H:%M") if run.start_time else "",
                "duration_s": run.total_run_time.total_seconds(),
                "metrics": summary.description if summary else "",
            })
        return rows
