"""Day-to-day operations: a local Prefect server, the nightly deployment, and run history."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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
    """Start a local Prefect server (SQLite, 127.0.0.1 only, analytics off) for the UI."""
    url = f"http://127.0.0.1:{port}"
    console.print(f"Prefect UI: {url}")
    console.print(f"Point runs at it:  export PREFECT_API_URL={url}/api")
    environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"{url}/api"}
    command = [_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    raise typer.Exit(subprocess.call(command, env=environment))


def serve(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    cron: str | None = typer.Option(None, help="Schedule (cron); default: the config's `schedule.cron`."),
) -> None:
    """Serve the pipeline for CONFIG on the config's `schedule:` (cron and timezone) from this process,
    without a work pool."""
    from prefect.schedules import Cron

    from flows.pipeline import checked_config, pipeline

    schedule = checked_config(config).schedule
    console.print(f"serving {config} on `{cron or schedule.cron}` ({schedule.timezone})")
    pipeline.serve(
        name=f"{config.stem}-served", schedules=[Cron(cron or schedule.cron, timezone=schedule.timezone)],
        parameters={"config_path": str(config)}, global_limit=1,
    )


def deploy(prefect_file: Path = typer.Option(PREFECT_FILE, help="Deployment definitions.")) -> None:
    """Register the deployments of deployments/prefect.yaml (with their work pool and the `gpu`
    concurrency limit) on the Prefect server named by PREFECT_API_URL."""
    if not os.environ.get("PREFECT_API_URL"):
        console.print("PREFECT_API_URL is not set: start `loraflow server` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
        raise typer.Exit(2)
    asyncio.run(_ensure_pool_and_limit())
    command = [_prefect_command(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    returncode = subprocess.call(command, cwd=REPO)
    if returncode == 0:
        for name, cron, timezone in asyncio.run(_apply_config_schedules(prefect_file)):
            console.print(f"{name}: scheduled `{cron}` ({timezone}) from its config's `schedule:`")
    raise typer.Exit(returncode)


async def _apply_config_schedules(prefect_file: Path) -> list[tuple[str, str, str]]:
    """Each deployment runs on the `schedule:` of the config it runs (cron and timezone), so the
    schedule lives in one place, next to the rest of the run's settings."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    from tasks.config import load_config

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
