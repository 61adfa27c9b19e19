"""The model registry: every export becomes a numbered version; `production` names the promoted one.

Layout of a registry directory (one per model line, default `<state_dir>/../registry/<name>`,
outside the state dir on purpose: that is a cache anyone may wipe, the registry is a record):

    versions/v0001/model/        the exported model (hard links into the export stage's output)
    versions/v0001/metrics.json  eval metrics of the version (what `promote_if` reads)
    versions/v0001/version.json  export fingerprint, lineage, when it was registered
    versions/v0001/decision.json the promotion gate's decision, written once
    versions/v0001/scores/       per-item scores on the gate's items, one file per (items, eval settings)
    production -> versions/v0001 a relative symlink, swapped atomically with os.replace
    history.jsonl                every move of the pointer, for `rollback` and for people

What a reader can rely on:
- A `versions/vNNNN` directory is complete: versions are assembled in `.vNNNN.partial` and renamed
  into place, so a process killed while registering leaves no version or a whole one.
- The `production` link always names a complete version (or does not exist yet).
- Registering the same export (same fingerprint) again returns its existing version; its gate
  decision is made once, when it is first registered, so a cached nightly re-run cannot promote
  again a version someone rolled back by hand.
- Writers take an exclusive lock on `.lock`, so the nightly run and a person running
  `loraflow promote` never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from tasks import atomic, gate
from tasks.config import RunConfig
from tasks.errors import ServiceError, StageFailedError
from tasks.serving import reachable

log = logging.getLogger("loraflow.registry")

VERSIONS = "versions"
PRODUCTION = "production"
HISTORY = "history.jsonl"
MODEL = "model"
_VERSION_NAME = re.compile(r"^v(\d{4,})$")


class RegistryError(StageFailedError):
    """The registry cannot do what was asked; the message says what exists and what to run."""


class HubPushError(ServiceError):
    """Pushing a promoted model to the hub failed for a reason other than being offline."""


@dataclass
class Version:
    name: str
    path: Path
    record: dict[str, Any]
    metrics: dict[str, Any]
    decision: dict[str, Any] | None


class RegistryBackend(Protocol):
    """Where versions are kept; the gate, `promote` and `rollback` work the same on each.
    `LocalRegistry` (a folder, below) and `tasks.registry_mlflow.MlflowRegistry` (MLflow's model
    registry, aliases `production` and `previous`)."""

    location: str

    def lock(self) -> contextlib.AbstractContextManager[None]: ...
    def versions(self) -> list[Version]: ...
    def version(self, name: str) -> Version: ...
    def production(self) -> str | None: ...
    def add(self, export_dir: Path, manifest: dict[str, Any]) -> tuple[Version, bool]: ...
    def record_decision(self, version: Version, decision: dict[str, Any]) -> None: ...
    def move_production(self, name: str, event: str, reason: str) -> None: ...
    def promoted_over(self, name: str) -> str | None: ...
    def fetch_model(self, version: Version) -> None: ...


@dataclass
class LocalRegistry:
    """The registry folder described at the top of this module."""

    root: Path

    @property
    def location(self) -> str:
        return str(self.root)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.root)

    def versions(self) -> list[Version]:
        return list_versions(self.root)

    def version(self, name: str) -> Version:
        return read_version(self.root, name)

    def production(self) -> str | None:
        return production(self.root)

    def add(self, export_dir: Path, manifest: dict[str, Any]) -> tuple[Version, bool]:
        return register(self.root, export_dir, manifest)

    def record_decision(self, version: Version, decision: dict[str, Any]) -> None:
        atomic.write_json(version.path / "decision.json", decision)

    def move_production(self, name: str, event: str, reason: str) -> None:
        set_production(self.root, name, event, reason)

    def promoted_over(self, name: str) -> str | None:
        promotions = [e for e in read_history(self.root) if e["event"] == "promoted" and e["version"] == name]
        return promotions[-1].get("previous") if promotions else None

    def fetch_model(self, version: Version) -> None:
        """The model is in the version folder already."""


def open_registry(cfg: RunConfig, model_uri: str | None = None) -> RegistryBackend:
    """The backend `export.registry` names; `model_uri` is what MLflow registers (the run's logged model)."""
    if cfg.export.registry == "mlflow":
        from tasks.registry_mlflow import MlflowRegistry

        return MlflowRegistry(cfg, model_uri)
    return LocalRegistry(registry_dir(cfg))


def as_backend(root: Path | RegistryBackend) -> RegistryBackend:
    return LocalRegistry(root) if isinstance(root, Path) else root


def registry_dir(cfg: RunConfig) -> Path:
    if cfg.export.registry_dir:
        return Path(cfg.export.registry_dir)
    return Path(cfg.state_dir).parent / "registry" / cfg.name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def normalise_version(name: str) -> str:
    """`3`, `v3` and `v0003` all name version v0003."""
    digits = name.lower().removeprefix("v")
    if not digits.isdigit():
        raise RegistryError(f"{name!r} is not a version name; versions look like v0003 (see `loraflow models`)")
    return f"v{int(digits):04d}"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive writer lock; the kernel releases it when the holder dies, even by kill -9."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_versions(root: Path) -> list[Version]:
    """Complete versions, oldest first (partial ones are invisible)."""
    versions_dir = root / VERSIONS
    if not versions_dir.is_dir():
        return []
    names = sorted((p.name for p in versions_dir.iterdir() if _VERSION_NAME.match(p.name)), key=lambda n: int(n[1:]))
    return [read_version(root, name) for name in names]


def read_version(root: Path, name: str) -> Version:
    path = root / VERSIONS / name
    if not (path / "version.json").is_file():
        raise RegistryError(f"no version {name} in {root}; `loraflow models` lists the versions")
    decision_path = path / "decision.json"
    return Version(
        name=name,
        path=path,
        record=json.loads((path / "version.json").read_text()),
        metrics=json.loads((path / "metrics.json").read_text()),
        decision=json.loads(decision_path.read_text()) if decision_path.is_file() else None,
    )


def production(root: Path) -> str | None:
    link = root / PRODUCTION
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def register(root: Path, export_dir: Path, manifest: dict[str, Any]) -> tuple[Version, bool]:
    """Adds the export as a new version, or returns the version it already is. Call under `locked`."""
    for version in list_versions(root):
        if version.record["fingerprint"] == manifest["fingerprint"]:
            return version, False
    versions_dir = root / VERSIONS
    versions_dir.mkdir(parents=True, exist_ok=True)
    for leftover in versions_dir.glob(".v*.partial"):
        shutil.rmtree(leftover)  # a writer killed mid-registration; we hold the lock, it is dead
    existing = [int(p.name[1:]) for p in versions_dir.iterdir() if _VERSION_NAME.match(p.name)]
    name = f"v{max(existing, default=0) + 1:04d}"
    work = versions_dir / f".{name}.partial"
    work.mkdir()
    _link_tree(export_dir / manifest["model_dir"], work / MODEL)
    if (export_dir / "formats").is_dir():  # export.quantize's inference formats
        _link_tree(export_dir / "formats", work / "formats")
    record = {
        "version": name,
        "fingerprint": manifest["fingerprint"],
        "kind": manifest.get("kind", "merged"),
        "merge_dtype": manifest.get("merge_dtype"),
        "lineage": manifest.get("lineage", {}),
        "verification": manifest.get("verification", {}),
        "export_dir": str(export_dir.resolve()),
        "registered_at": _now(),
    }
    atomic.write_json(work / "metrics.json", manifest.get("metrics", {}))
    atomic.write_json(work / "version.json", record)  # last file: its presence marks the version complete
    if not atomic.publish_dir(work, versions_dir / name):
        raise RegistryError(f"{versions_dir / name} appeared while registering it; another run is registering into {root}")
    _append_history(root, {"event": "registered", "version": name, "fingerprint": manifest["fingerprint"]})
    log.info("registry: registered %s in %s", name, root)
    return read_version(root, name), True


def register_and_gate(
    cfg: RunConfig, export_dir: Path, manifest: dict[str, Any], candidate: gate.GateItems | None = None,
    production_scorer: gate.ProductionScorer | None = None, model_uri: str | None = None,
) -> dict[str, Any]:
    """Registers the export and, the first time, applies `export.promote_if` to it: the decision
    (promoted or not, and why) is returned, and recorded in the version. The same gate whichever
    backend keeps the versions (`export.registry`: this folder, or MLflow's registry, where
    `model_uri` is the export as the pipeline's MLflow run logged it).

    With `candidate` (the new version's per-item scores, `tasks.gate`), conditions on a per-item
    metric compare candidate and production on those same items: production's stored scores for
    the same items and eval settings, else scored now by `production_scorer` (default: served
    locally, `gate.score_production`)."""
    backend = open_registry(cfg, model_uri)
    scorer = production_scorer or gate.score_production

    def fetch_and_score(run_cfg: RunConfig, version: Version, items: gate.GateItems) -> list[dict[str, float]]:
        backend.fetch_model(version)
        return scorer(run_cfg, version, items)

    with backend.lock():
        version, created = backend.add(export_dir, manifest)
        if version.decision is not None:
            return {**version.decision, "already_decided": True, "production": backend.production()}
        current = backend.production()
        if candidate is not None:
            gate.store_scores(version.path, candidate, candidate.scores)
        if current == version.name:
            # A run killed between moving the pointer and recording why.
            decision = {"promoted": True, "reason": f"{version.name} is already production", "checks": []}
        else:
            production_version = backend.version(current) if current else None
            paired = None
            if candidate is not None and production_version is not None and gate.needs_production(cfg.export.promote_if):
                paired = gate.production_items(cfg, production_version, candidate, fetch_and_score)
            decision = gate.evaluate_gate(
                cfg.export.promote_if, version.metrics, production_version.metrics if production_version else None, current,
                candidate, paired,
            )
        decision.update(version=version.name, production_before=current, registry=backend.location, decided_at=_now(), hub=None)
        if decision["promoted"] and current != version.name:
            if cfg.hub_model_id:
                backend.fetch_model(version)
                decision["hub"] = push_to_hub(cfg, version.path / MODEL)
            backend.move_production(version.name, "promoted", decision["reason"])
        backend.record_decision(version, decision)
        return {**decision, "already_decided": False, "production": backend.production()}


def set_production(root: Path, name: str, event: str, reason: str) -> None:
    """Points `production` at a complete version, atomically. Call under `locked`."""
    version = read_version(root, name)
    previous = production(root)
    # The log is written first: if we die before the swap, the pointer (the truth) is unchanged
    # and `rollback` reads only promotions that point where the link points.
    _append_history(root, {"event": event, "version": name, "previous": previous, "reason": reason})
    atomic.replace_symlink(root / PRODUCTION, Path(VERSIONS) / version.name)
    log.info("registry: production is now %s (%s)", name, reason)


def promote(root: Path | RegistryBackend, name: str) -> tuple[str | None, str]:
    """Moves `production` to a version by hand. Returns (previous, new)."""
    backend = as_backend(root)
    name = normalise_version(name)
    with backend.lock():
        backend.version(name)  # a clear error for a version that does not exist
        previous = backend.production()
        if previous == name:
            raise RegistryError(f"{name} is already production")
        backend.move_production(name, "promoted", "promoted by hand (loraflow promote)")
        return previous, name


def rollback(root: Path | RegistryBackend) -> tuple[str, str]:
    """Moves `production` back to the version that was production before the current one was
    promoted. Repeated rollbacks walk further back. Returns (previous, new)."""
    backend = as_backend(root)
    with backend.lock():
        current = backend.production()
        if current is None:
            raise RegistryError(f"{backend.location} has no production version to roll back from")
        target = backend.promoted_over(current)
        if target is None:
            raise RegistryError(f"{current} was the first production version: there is nothing to roll back to")
        backend.move_production(target, "rollback", f"rolled back from {current} by hand (loraflow rollback)")
        return current, target


def read_history(root: Path) -> list[dict[str, Any]]:
    """History entries; a line torn by a crash mid-append is skipped."""
    path = root / HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def push_to_hub(cfg: RunConfig, model_dir: Path) -> dict[str, Any]:
    """Uploads a promoted model to `hub_model_id`. Offline (HF_HUB_OFFLINE, or the hub endpoint
    unreachable) it is skipped with a message saying how to push later; any other failure raises."""
    later = f"push it later with `hf upload {cfg.hub_model_id} {model_dir}`"
    offline_flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if offline_flag or not reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline_flag else f"{endpoint} is unreachable"
        message = f"push to {cfg.hub_model_id} skipped: {why}; {later}"
        log.warning(message)
        return {"status": "skipped", "reason": message}
    token = os.environ.get(cfg.export.hub_token_env)
    if not token:
        raise HubPushError(
            f"hub_model_id is {cfg.hub_model_id} but ${cfg.export.hub_token_env} is not set: export a token with "
            f"write access, or remove hub_model_id"
        )
    from huggingface_hub import HfApi

    try:
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(cfg.hub_model_id, private=cfg.export.hub_private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=cfg.hub_model_id, folder_path=str(model_dir), commit_message=f"loraflow: {model_dir.parent.name}"
        )
    except Exception as error:
        raise HubPushError(f"push of {model_dir} to {cfg.hub_model_id} failed: {error}; {later}") from error
    log.info("registry: pushed %s to %s", model_dir, cfg.hub_model_id)
    return {"status": "pushed", "repo": cfg.hub_model_id, "commit": getattr(commit, "oid", None)}


def decision_markdown(decision: dict[str, Any]) -> str:
    verdict = "promoted to production" if decision["promoted"] else "kept, not promoted"
    lines = [
        f"# Promotion: {decision['version']} {verdict}",
        "",
        f"{decision['reason']}",
        "",
        f"Production before: {decision.get('production_before') or 'none'}; now: {decision.get('production') or 'none'}.",
    ]
    if decision.get("already_decided"):
        lines.append(f"(Decided when {decision['version']} was first registered, at {decision.get('decided_at')}.)")
    if decision.get("checks"):
        lines += ["", "| metric | value | production | difference | interval | items | passed | detail |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {c['metric']} | {c['value']} | {c['production_value']} | {c.get('difference', '')} | {c.get('interval') or ''} "
            f"| {c.get('items', '')} | {c['passed']} | {c['detail']} |" for c in decision["checks"]
        ]
    if decision.get("hub"):
        lines += ["", f"Hub: {decision['hub'].get('status')} {decision['hub'].get('reason', decision['hub'].get('repo', ''))}"]
    return "\n".join(lines) + "\n"


def _link_tree(source: Path, target: Path) -> None:
    """Hard links (the export is immutable, so sharing its inodes is safe and costs no space);
    a copy where the registry lives on another file system."""
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _append_history(root: Path, entry: dict[str, Any]) -> None:
    with (root / HISTORY).open("a") as handle:
        handle.write(json.dumps({"at": _now(), **entry}, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
