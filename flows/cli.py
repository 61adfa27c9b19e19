"""The `loraflow` command line.

Heavy libraries (torch, transformers, Prefect) are imported inside the commands that need them,
so `loraflow validate` answers in about a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tasks.config import ConfigError, RunConfig, load_config

# No network here, and telemetry against a SQLite server can cause "database is locked".
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Our stage loggers reach the Prefect UI next to Prefect's own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tuning pipelines: prep -> train -> eval -> export.")
config_app = typer.Typer(no_args_is_help=True, help="The config format.")
app.add_typer(config_app, name="config")
console = Console()
CONFIG_ERROR_EXIT = 2


def _load_checked(config_path: Path) -> RunConfig:
    from tasks.preflight import preflight

    try:
        cfg = load_config(config_path)
        for note in preflight(cfg, config_path):
            console.print(f"[yellow]note:[/] {note}")
        return cfg
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None


@app.command()
def validate(config: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Check a config and everything that can be checked without loading data or weights."""
    _load_checked(config)
    console.print(f"{config}: OK")


@config_app.command("schema")
def schema() -> None:
    """Print the JSON schema of the run config."""
    print(json.dumps(RunConfig.model_json_schema(), indent=2))


@app.command()
def run(config: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Run the pipeline; stages whose inputs did not change come back cached."""
    cfg = _load_checked(config)
    from flows.pipeline import SUMMARY, pipeline

    started = time.monotonic()
    summary = pipeline(str(config))
    _print_summary(summary, time.monotonic() - started)
    console.print(f"summary written to {Path(cfg.output_dir) / SUMMARY}")


def _print_summary(summary: dict, total_s: float) -> None:
    table = Table(title=f"loraflow run: {summary['config']}")
    for column in ("stage", "state", "duration", "key numbers"):
        table.add_column(column)
    key_numbers = {
        "prep": ", ".join(f"{k}={v}" for k, v in summary["prep"].items()),
        "train": ", ".join(f"{k}={_short(v)}" for k, v in summary["train"].items() if v is not None),
        "eval": "; ".join(
            f"{model}: " + ", ".join(f"{k}={_short(v)}" for k, v in metrics.items() if k in ("accuracy", "exact_match", "samples"))
            for model, metrics in summary["eval"].items()
        ),
        "export": summary["export_path"],
    }
    for stage, outcome in summary["stages"].items():
        table.add_row(stage, outcome["state"], f"{outcome['duration_s']:.1f} s", key_numbers.get(stage, ""))
    console.print(table)
    console.print(f"pipeline finished in {total_s:.1f} s")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
