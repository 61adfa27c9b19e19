"""`loraflow models | promote VERSION | rollback`: the model registry by hand.

Which registry: `--registry DIR`, or the one a run config uses (`--config CONFIG`: its
`export.registry_dir`, default `<state_dir>/../registry/<name>`, or MLflow's model registry with
`export.registry: mlflow`), or, with neither, the only registry under `.loraflow/registry/`.
Nothing heavy is imported (MLflow only for an MLflow registry): these answer in about a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from tasks import gate, registry
from tasks.config import ConfigError, RunConfig
from tasks.config_load import load_config

registry_app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()
DEFAULT_REGISTRY_ROOT = Path(".loraflow/registry")
USAGE_ERROR_EXIT = 2

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="Run config whose registry to use.")
REGISTRY_OPTION = typer.Option(None, "--registry", "-r", help="Registry directory (overrides --config).")


def resolve_registry(config: Path | None, registry_path: Path | None) -> registry.RegistryBackend:
    """The registry backend: a folder, or MLflow's registry for a config with `export.registry: mlflow`."""
    if registry_path is None and config is not None:
        cfg = _load(config)
        if cfg.export.registry == "mlflow":
            return registry.open_registry(cfg)
        registry_path = registry.registry_dir(cfg)
    if registry_path is not None:
        if not registry_path.is_dir():
            _fail(f"no registry at {registry_path}: `loraflow run CONFIG` creates it with its first export")
        return registry.LocalRegistry(registry_path)
    candidates = sorted(p for p in DEFAULT_REGISTRY_ROOT.glob("*") if (p / registry.VERSIONS).is_dir())
    if len(candidates) == 1:
        return registry.LocalRegistry(candidates[0])
    found = ", ".join(str(p) for p in candidates) or f"none under {DEFAULT_REGISTRY_ROOT}"
    _fail(f"which registry? pass --config CONFIG or --registry DIR (registries found: {found})")


def _load(config: Path) -> RunConfig:
    try:
        return load_config(config)
    except ConfigError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(USAGE_ERROR_EXIT)


@registry_app.command("models")
def models(
    config: Path | None = CONFIG_OPTION,
    registry_path: Path | None = REGISTRY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registry's versions, their eval metrics and which one is production."""
    backend = resolve_registry(config, registry_path)
    versions = backend.versions()
    current = backend.production()
    rows = [
        {
            "version": version.name,
            "production": version.name == current,
            "registered_at": version.record.get("registered_at"),
            "fingerprint": version.record.get("fingerprint", "")[:12],
            "kind": version.record.get("kind"),
            "metrics": _headline_metrics(version.metrics),
            "decision": (version.decision or {}).get("reason"),
        }
        for version in versions
    ]
    if as_json:
        print(json.dumps({"registry": backend.location, "production": current, "versions": rows}, indent=2))
        return
    table = Table(title=f"models in {backend.location}")
    for column in ("", "version", "registered", "kind", "metrics", "gate decision"):
        table.add_column(column)
    for row in rows:
        metrics = ", ".join(f"{name}={value:.4g}" for name, value in row["metrics"].items())
        table.add_row("*" if row["production"] else "", row["version"], row["registered_at"], row["kind"], metrics, row["decision"] or "")
    console.print(table)
    console.print(f"production: {current or 'none'}" if versions else "no versions yet: `loraflow run CONFIG` registers each export")


def _headline_metrics(metrics: dict) -> dict[str, float]:
    headline = {}
    for model in ("tuned", "base"):
        for name in ("accuracy", "exact_match"):
            value = gate.metric_value(metrics, f"{model}.{name}")
            if value is not None:
                headline[f"{model}.{name}"] = value
    if (loss := gate.metric_value(metrics, "eval_loss")) is not None:
        headline["eval_loss"] = loss
    return headline


@registry_app.command("promote")
def promote(
    version: str = typer.Argument(..., help="Version to make production, e.g. v0003 or 3."),
    config: Path | None = CONFIG_OPTION,
    registry_path: Path | None = REGISTRY_OPTION,
) -> None:
    """Point production at VERSION, whatever its gate decision was."""
    root = resolve_registry(config, registry_path)
    try:
        previous, current = registry.promote(root, version)
    except registry.RegistryError as error:
        _fail(str(error))
    console.print(f"production: {previous or 'none'} -> {current}")


@registry_app.command("rollback")
def rollback(config: Path | None = CONFIG_OPTION, registry_path: Path | None = REGISTRY_OPTION) -> None:
    """Point production back at the version that was production before the current one."""
    root = resolve_registry(config, registry_path)
    try:
        previous, current = registry.rollback(root)
    except registry.RegistryError as error:
        _fail(str(error))
    console.print(f"production: {previous} -> {current}")
