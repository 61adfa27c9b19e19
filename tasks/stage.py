"""The stage contract: how every stage is keyed, reused, built, published and wrapped for Prefect.

A stage declares its name, its upstream stages, the settings and files that decide its output, the
code it runs, its `build` (named as "module:function", imported only when the stage must run, so
a cached run never imports torch), and which parts of its manifest a downstream stage reads.

**Keys with early cutoff.** A stage's key hashes its settings, its code, the identity of the files
it reads itself (sources, contracts, tokenizer, model revision, library versions) and the
*output digests* of the upstream manifests it consumes, never the upstream keys. So an upstream
edit that leaves the upstream output byte-identical (an expectation every row meets, a comment
in the prep code) re-runs that upstream stage and nothing downstream, as Bazel and Nix's
content-addressed actions do.

**One runner.** `run_stage`: reuse the output published under the key, else build it in
`<key>.partial` under the key's lock and publish it (manifest last, directory renamed into place).
A stage several machines build together (`multi_node`: training with `num_machines`) is built
by machine 0 as above; the others join its `<key>.partial` on the shared state_dir and return
the manifest machine 0 publishes. `prefect_task` makes the Prefect task of any stage with the key
as its cache key. A disk that fills during a build fails any stage the same way
(`tasks.disk.DiskFullError`), publishing nothing.

Each manifest carries `fingerprint` (its key), `key_parts` (hashes of what went into the key)
and `output_digest`. `<state_dir>/.latest/<stage>.json` remembers the last key parts, so a run can
say why a stage ran ("contracts changed") or came back cached ("upstream output unchanged").
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import atomic, disk, store
from tasks.config import RunConfig, stage_settings
from tasks.errors import StageFailedError
from tasks.fingerprint import FileHasher, code_version, hash_json

log = logging.getLogger("loraflow.stage")

# <state_dir>/.latest/<stage>.json: outside the stage directories, which hold outputs only.
LATEST_DIR = ".latest"
Manifests = dict[str, dict[str, Any]]


def _no_inputs(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline; see the module docstring."""

    name: str
    upstream: tuple[str, ...]
    # tasks/ modules whose source decides the output: editing them re-runs the stage.
    code: tuple[str, ...]
    # "module:function" with signature (cfg, work_dir, upstream manifests, **options) -> manifest fields.
    build: str
    # Content identity of the files the stage reads itself, by name ("sources", "tokenizer", ...).
    inputs: Callable[[RunConfig, FileHasher], dict[str, Any]] = _no_inputs
    # Config settings that never change the output (how requests are made, where a registry is).
    settings_ignored: tuple[str, ...] = ()
    # What a downstream stage reads from this stage's manifest (with its `key_parts`); its hash is
    # the output digest.
    reads: Callable[[dict[str, Any]], Any] = lambda manifest: None
    # Keep `<key>.partial` across attempts (training's checkpoints) instead of starting empty.
    resumable: bool = False
    # "module:function" (cfg, manifest) -> None that records Prefect artifacts after a build.
    report: str | None = None
    # Holds an accelerator while it runs: queued by the `gpu` tag's concurrency limit.
    uses_gpu: bool = False
    # Built by `num_machines` machines together (training): machine 0 builds and publishes, the others
    # join its build (`_join_machine_zero`).
    multi_node: bool = False
    description: str = field(default="", compare=False)

    def settings(self, cfg: RunConfig) -> dict[str, Any]:
        settings = stage_settings(cfg, self.name)
        for dotted in self.settings_ignored:
            _drop(settings, dotted.split("."))
        return settings


def _drop(settings: dict[str, Any], path: list[str]) -> None:
    head, *rest = path
    if not rest:
        settings.pop(head, None)
    elif isinstance(settings.get(head), dict):
        _drop(settings[head], rest)


def key_parts(stage: Stage, cfg: RunConfig, upstream: Manifests, hasher: FileHasher | None = None) -> dict[str, Any]:
    """The hashes a stage's key is made of, by name: what `why_ran` compares between runs."""
    hasher = hasher or FileHasher()
    missing = [name for name in stage.upstream if name not in upstream]
    if missing:
        raise store.MissingUpstreamError(f"`{stage.name}` needs the output of {', '.join(missing)} first")
    return {
        "settings": hash_json(stage.settings(cfg)),
        "code": code_version(*stage.code),
        **{f"inputs.{name}": hash_json(value) for name, value in stage.inputs(cfg, hasher).items()},
        **{f"upstream.{name}": upstream[name]["output_digest"] for name in stage.upstream},
    }


def stage_key(stage: Stage, cfg: RunConfig, upstream: Manifests, hasher: FileHasher | None = None) -> str:
    return hash_json({"stage": stage.name, **key_parts(stage, cfg, upstream, hasher)})


def output_digest(stage: Stage, manifest: dict[str, Any]) -> str:
    return hash_json({"stage": stage.name, "reads": stage.reads(manifest)})


def import_function(dotted: str) -> Callable[..., Any]:
    module, _, function = dotted.partition(":")
    return getattr(importlib.import_module(module), function)


def run_stage(
    stage: Stage, cfg: RunConfig, upstream: Manifests | None = None, key: str | None = None,
    hasher: FileHasher | None = None, **options: Any,
) -> dict[str, Any]:
    """The stage's manifest: the published one for its key, or a new one built and published now.

    `options` go to the build (e.g. training callbacks); they must not change the output."""
    upstream = upstream or {}
    parts = key_parts(stage, cfg, upstream, hasher)
    key = key or hash_json({"stage": stage.name, **parts})
    final_dir = store.stage_dir(cfg, stage.name, key)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    if stage.multi_node and cfg.machine_rank > 0:
        return _join_machine_zero(stage, cfg, upstream, final_dir, options)
    with store.build_lock(final_dir):
        if (existing := store.read_manifest(final_dir)) is not None:  # built by a run we waited for
            return existing
        work_dir = store.partial_dir(final_dir)
        if stage.resumable:
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = store.fresh_partial_dir(final_dir)
        started = time.monotonic()
        try:
            built = import_function(stage.build)(cfg, work_dir, {name: upstream[name] for name in stage.upstream}, **options)
            manifest = {
                **built,
                "stage": stage.name,
                "fingerprint": key,
                "key_parts": parts,
                "output_digest": output_digest(stage, {**built, "key_parts": parts}),
                "duration_s": round(time.monotonic() - started, 2),
            }
            return store.publish(work_dir, final_dir, manifest)
        except Exception as error:
            # Every stage writes through here: a full disk fails each the same way (tasks/disk.py).
            if not disk.is_disk_full(error, work_dir):
                raise
            disk_full = disk.disk_full_error(cfg, stage.name, work_dir, error, kept=stage.resumable)
            if not stage.resumable:  # nothing to resume from: give the space back now
                shutil.rmtree(work_dir, ignore_errors=True)
            raise disk_full from error


def _join_machine_zero(stage: Stage, cfg: RunConfig, upstream: Manifests, final_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Machine `machine_rank` > 0 of a stage several machines build together: builds alongside machine
    0 in its working directory (a shared state_dir), without the key's lock (machine 0 holds it while
    they build), and returns the manifest machine 0 publishes once they are done."""
    work_dir = store.partial_dir(final_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    import_function(stage.build)(cfg, work_dir, {name: upstream[name] for name in stage.upstream}, **options)
    deadline = time.monotonic() + cfg.ddp_timeout
    while (manifest := store.read_manifest(final_dir)) is None:
        if time.monotonic() > deadline:
            raise StageFailedError(
                f"{stage.name}: machine {cfg.machine_rank} finished its part, but machine 0 published nothing in {final_dir} "
                f"within ddp_timeout ({cfg.ddp_timeout} s); see machine 0's log (is state_dir shared by every machine?)"
            )
        time.sleep(0.5)
    return manifest


def remember(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """Records a stage's key parts as the latest, for the next run's `why_ran`."""
    latest = {"key": manifest["fingerprint"], "key_parts": manifest["key_parts"]}
    atomic.write_json(Path(cfg.state_dir) / LATEST_DIR / f"{manifest['stage']}.json", latest)


def why_ran(cfg: RunConfig, manifest: dict[str, Any], refreshed: bool = False) -> str:
    """What changed since the stage's previous output: "contracts changed", "code changed", ..."""
    if refreshed:
        return "refreshed on request"
    try:
        import json

        previous = json.loads((Path(cfg.state_dir) / LATEST_DIR / f"{manifest['stage']}.json").read_text())
    except (FileNotFoundError, ValueError):
        return "first run"
    if previous["key"] == manifest["fingerprint"]:
        return "output was missing"
    changed = [name for name, value in manifest["key_parts"].items() if previous["key_parts"].get(name) != value]
    return ", ".join(_describe(name) for name in changed) + " changed" if changed else "key scheme changed"


def _describe(part: str) -> str:
    kind, _, name = part.partition(".")
    if kind == "upstream":
        return f"{name} output"
    return name or kind


def retry_unless_final(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: an error that says `retryable = False` (a spent eval budget:
    a retry would spend it again) ends the stage at once; anything else gets the stage's retries."""
    return getattr(getattr(state, "data", None), "retryable", True) is not False


def artifact_key(run_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only; keys stay stable
    across nightly runs so the UI shows their history. (Here, not beside the training callbacks
    that use it too: a cached run makes artifacts and must not import transformers for that.)"""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run_name}-{what}".lower()).strip("-")


def prefect_task(stage: Stage) -> Any:
    """The Prefect task of a stage: cached on the stage key, returning the manifest (JSON)."""
    from prefect import task

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        # The state_dir too: the manifest names files there, and another state_dir may not hold them.
        where = hash_json(str(Path(parameters["cfg"].state_dir).resolve()))[:12]
        return f"loraflow-{stage.name}-{parameters['key']}-{where}"

    @task(name=stage.name, cache_key_fn=cache_key, persist_result=True, result_serializer="json", tags=["gpu"] if stage.uses_gpu else [],
          retry_condition_fn=retry_unless_final)
    def stage_task(cfg: RunConfig, key: str, upstream: Manifests) -> dict[str, Any]:
        manifest = run_stage(stage, cfg, upstream, key=key)
        if stage.report is not None:
            import_function(stage.report)(cfg, manifest)
        return manifest

    return stage_task
