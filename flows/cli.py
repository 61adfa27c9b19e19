"""The `loraflow` command line.

Heavy libraries (torch, transformers, Prefect) are imported inside the commands that need them,
so `loraflow validate` answers in about a second.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flows import ops_cli
from flows.registry_cli import registry_app
from tasks.config import ConfigError, RunConfig
from tasks.config_load import load_config
from tasks.errors import LoraflowError

# No network here, and telemetry against a SQLite server can cause "database is locked".
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Our stage loggers reach the Prefect UI next to Prefect's own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
# The ephemeral API server migrates its database on a fresh PREFECT_HOME: on a busy 2-core machine
# that took longer than Prefect's 20 s default, and a newcomer's first run died of it.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
# Flow runs send heartbeats (Prefect's minimum interval): a server's automation marks a run whose
# process was killed Crashed when they stop (tasks/zombies.py). Inherited by `serve`'s flow runs.
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tuning pipelines: prep -> train -> eval -> export.")
config_app = typer.Typer(no_args_is_help=True, help="The config format.")
app.add_typer(config_app, name="config")
contract_app = typer.Typer(no_args_is_help=True, help="Data contracts.")
app.add_typer(contract_app, name="contract")
app.add_typer(registry_app)  # `loraflow models`, `loraflow promote VERSION`, `loraflow rollback`
for command in (ops_cli.server, ops_cli.serve, ops_cli.deploy, ops_cli.runs):
    app.command()(command)
console = Console()
CONFIG_ERROR_EXIT = 2


def _load_checked(config_path: Path, for_run: bool = True) -> RunConfig:
    from tasks.preflight import preflight

    try:
        cfg = load_config(config_path)
        for note in [*cfg.notes, *preflight(cfg, config_path, for_run=for_run)]:
            console.print(Text.assemble(("note: ", "yellow"), note))
        return cfg
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print problems, notes and the memory estimate as one JSON object."),
) -> None:
    """Check a config: the schema and every preflight check in one pass, all problems and notes at
    once, and the peak GPU memory estimate. Exit code 2 when there is a problem; what cannot be
    checked here (no model, no GPU) is a note."""
    from tasks.preflight import validate_config

    validation = validate_config(config)
    if as_json:
        print(json.dumps(validation.as_json(), indent=2))
    else:
        for note in validation.notes:
            console.print(Text.assemble(("note: ", "yellow"), note))
        for line in validation.estimate_lines:
            console.print(Text(line))
        if validation.ok:
            console.print(f"{config}: OK")
        else:
            lines = "\n".join(f"  - {problem}" for problem in validation.problems)
            print(f"error: {config}: {len(validation.problems)} problem(s):\n{lines}", file=sys.stderr)
    if not validation.ok:
        raise typer.Exit(CONFIG_ERROR_EXIT)


@config_app.command("schema")
def schema() -> None:
    """Print the JSON schema of the run config."""
    print(json.dumps(RunConfig.model_json_schema(), indent=2))


@app.command()
def run(
    configs: list[Path] = typer.Argument(..., help="Run config(s) (YAML); one pipeline per config."),
    only: str | None = typer.Option(None, "--only", help="Run just this stage, on the cached outputs upstream."),
    start_from: str | None = typer.Option(None, "--from", help="Run this stage and every stage after it."),
    refresh: list[str] = typer.Option([], "--refresh", help="Re-run this stage although it is cached (repeatable)."),
    max_parallel: int = typer.Option(1, "--max-parallel", min=1, help="Pipelines running at once."),
    smoke: bool = typer.Option(False, "--smoke", help="A first try: the first rows, a few steps, a small eval, in its own state."),
    smoke_rows: int = typer.Option(200, "--smoke-rows", min=1, help="Rows of each source read by --smoke."),
    ray_address: str | None = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Run the stages on this Ray cluster (HOST:PORT of the head, ray://HOST:10001 or auto); every pipeline at once. "
        "state_dir must be on storage every node sees.",
    ),
) -> None:
    """Run the pipeline; stages whose inputs did not change come back cached."""
    server = _start_ephemeral_server()
    from flows.batch import run_pipelines
    from flows.pipeline import checked_config

    for config in configs:
        try:
            # The flow gets this same object back: loaded and checked once per run.
            cfg = checked_config(config, on_ray=ray_address is not None)
        except LoraflowError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(error.exit_code) from None
        ops_cli.set_up_crash_alert(cfg, config)
    if server is not None:
        server.join()

    started = time.monotonic()
    try:
        outcomes = run_pipelines(
            configs, only=only, start_from=start_from, refresh=refresh, max_parallel=max_parallel, smoke_rows=smoke_rows if smoke else None,
            ray_address=ray_address,
        )
    except LoraflowError as error:  # the Ray cluster cannot run them (flows/ray_cluster.py)
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(error.exit_code) from None
    for outcome in outcomes:
        if outcome.summary is not None:
            _print_summary(outcome.summary)
    if len(outcomes) > 1 or outcomes[0].error:
        _print_outcomes(outcomes)
    console.print(f"finished in {time.monotonic() - started:.1f} s")
    failed = [outcome for outcome in outcomes if outcome.error]
    if failed:
        raise typer.Exit(max(outcome.exit_code for outcome in failed))


def _start_ephemeral_server() -> threading.Thread | None:
    """Without PREFECT_API_URL, Prefect starts a temporary API server at the first flow run, which
    takes seconds. Started here in the background instead, it comes up while the config is loaded
    and checked; the flow then finds it running (Prefect keeps one per process)."""
    if os.environ.get("PREFECT_API_URL"):
        return None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        try:
            SubprocessASGIServer().start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        except RuntimeError:
            pass  # the flow's own start reports the failure with Prefect's message

    thread = threading.Thread(target=start, name="prefect-ephemeral-server", daemon=True)
    thread.start()
    return thread


def _print_outcomes(outcomes: list) -> None:
    table = Table(title="pipelines")
    for column in ("config", "outcome", "detail"):
        table.add_column(column)
    for outcome in outcomes:
        detail = outcome.error or str(Path(outcome.summary_path))
        # Text, not markup: an error's traceback holds [brackets] that rich would read as tags.
        table.add_row(str(outcome.config), "failed" if outcome.error else "completed", Text(detail))
    console.print(table)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"loraflow run: {summary['config']}")
    for column in ("stage", "state", "why", "duration", "key numbers"):
        table.add_column(column)
    key_numbers = {
        "prep": ", ".join(f"{k}={v}" for k, v in (summary["prep"] or {}).items()),
        "train": ", ".join(f"{k}={_short(v)}" for k, v in (summary["train"] or {}).items() if v is not None),
        "eval": "; ".join(
            f"{model}: " + ", ".join(f"{k}={_short(v)}" for k, v in metrics.items() if k in ("accuracy", "exact_match", "samples"))
            for model, metrics in (summary["eval"] or {}).items()
        ),
        "export": summary["export_path"] or "",
    }
    for stage, outcome in summary["stages"].items():
        table.add_row(stage, outcome["state"], outcome["reason"], f"{outcome['duration_s']:.1f} s", key_numbers.get(stage, ""))
    console.print(table)
    if summary.get("loss_curve"):
        console.print(f"loss curve: {summary['loss_curve']}")
    if comparison := (summary.get("pictures") or {}).get("comparison"):
        console.print(f"base vs tuned: {comparison}")
    for tracker, where in (summary.get("tracking") or {}).items():
        console.print(f"{tracker}: {where}", markup=False)
    if promotion := summary.get("promotion"):
        console.print(f"{promotion['version']}: {promotion['reason']} (production: {promotion['production'] or 'none'})")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contract_app.command("check")
def contract_check(
    data: Path = typer.Argument(..., help="Data file (JSONL, JSON, Parquet, CSV) or `datasets` directory."),
    contract: str = typer.Option(..., help="Contract name (a YAML file in --contracts-dir)."),
    contracts_dir: Path = typer.Option(Path("data_contracts"), help="Where contracts live."),
    dataset_type: str = typer.Option("chat_template", "--type", help="Row format, as `datasets[].type`."),
    field_messages: str = typer.Option("messages", help="Column with the messages."),
    base_model: Path | None = typer.Option(None, help="Model whose tokenizer gives num_tokens (optional)."),
    data_docs: Path | None = typer.Option(None, help="Write GX Data Docs HTML into this new directory."),
) -> None:
    """Validate a data file against a contract without running the pipeline; exits 1 when an
    `error` expectation fails."""
    from tasks.config import DatasetConfig
    from tasks.contracts import ContractError
    from tasks.formats import DatasetError
    from tasks.prep import check_contract

    try:
        dataset = DatasetConfig(path=str(data), type=dataset_type, field_messages=field_messages, contract=contract)
        tokenizer = None
        if base_model is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
        summary = check_contract(dataset, contracts_dir, tokenizer, data_docs)
    except (ContractError, DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None
    table = Table(title=f"contract {summary['contract']} on {data}: {summary['rows']} rows checked, {summary['rows_rejected']} unreadable")
    for column in ("expectation", "column", "severity", "result", "unexpected", "examples"):
        table.add_column(column)
    for check in summary["checks"]:
        result = "pass" if check["success"] else ("FAIL" if check["severity"] == "error" else "warn")
        examples = check["exception"] or ", ".join(map(str, check["unexpected_examples"]))
        table.add_row(check["expectation"], str(check["column"]), check["severity"], result, str(check["unexpected_count"]), examples)
    console.print(table)
    console.print("contract passed" if summary["passed"] else "contract FAILED (an `error` expectation failed)")
    if not summary["passed"]:
        raise typer.Exit(1)


@app.command("tiny-model")
def tiny_model(
    output_dir: Path = typer.Argument(..., help="Where to write the model."),
    seed: int = typer.Option(0, help="Same seed, same files."),
    corpus: list[Path] = typer.Option([], help="JSONL files whose text trains the tokenizer."),
) -> None:
    """Build a small random-weight Llama and a locally trained tokenizer (no hub needed)."""
    from tasks.tiny_model import build_tiny_model

    path = build_tiny_model(output_dir, seed=seed, corpus_files=corpus)
    console.print(f"tiny model ready in {path}")


if __name__ == "__main__":
    app()
