"""The pipeline flow: prep -> train -> eval -> export.

Each stage is a Prefect task cached on its content fingerprint. The flow computes the fingerprints
(cheap: file hashes are memoised), asks each task for its manifest, and records what ran and what
came back cached. A fingerprint whose output directory has gone missing is re-run, whatever
Prefect's result store remembers.

A run can be narrowed to some stages (`only`, `start_from`): the stages before them must already
have outputs for the current fingerprints, and are reused, not re-run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks import eval as eval_stage
from tasks import export, prep, store, train
from tasks.config import RunConfig, load_config
from tasks.fingerprint import FileHasher
from tasks.preflight import preflight

SUMMARY = "run_summary.json"
# The stages log progress at INFO under `loraflow.*` (PREFECT_LOGGING_EXTRA_LOGGERS routes them to the
# UI); left at the root's WARNING, those lines would be dropped before any handler saw them.
logging.getLogger("loraflow").setLevel(logging.INFO)
# Stages that hold an accelerator: a Prefect tag concurrency limit named `gpu` queues them.
GPU_TAG = "gpu"
GPU_STAGES = ("train", "eval", "export")


class StageSelectionError(ValueError):
    """`only`, `start_from` or `refresh` names a stage that does not exist."""


@dataclass
class StageOutcome:
    stage: str
    state: str  # "ran", "cached", "reused" (upstream of the selected stages) or "skipped"
    duration_s: float
    fingerprint: str


@dataclass
class StagePlan:
    """Which stages run, and which must run although cached."""

    selected: tuple[str, ...] = store.STAGES
    refresh: frozenset[str] = frozenset()
    outcomes: list[StageOutcome] = field(default_factory=list)

    @classmethod
    def build(cls, only: str | None = None, start_from: str | None = None, refresh: list[str] | None = None) -> StagePlan:
        for name in [only, start_from, *(refresh or [])]:
            if name is not None and name not in store.STAGES:
                raise StageSelectionError(f"unknown stage `{name}`; stages are {', '.join(store.STAGES)}")
        if only and start_from:
            raise StageSelectionError("use either `only` or `start_from`, not both")
        selected = (only,) if only else store.STAGES[store.STAGES.index(start_from):] if start_from else store.STAGES
        return cls(selected=selected, refresh=frozenset(refresh or []))


def _run_name() -> str:
    config_name = Path(flow_run.parameters["config_path"]).stem
    return f"{config_name}-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"


def run_stage(stage_task: Any, cfg: RunConfig, stage: str, fingerprint: str, plan: StagePlan, **upstream: str) -> dict | None:
    final_dir = store.stage_dir(cfg, stage, fingerprint)
    started = time.monotonic()
    if stage not in plan.selected:
        if store.STAGES.index(stage) > store.STAGES.index(plan.selected[-1]):
            plan.outcomes.append(StageOutcome(stage, "skipped", 0.0, fingerprint))
            return None
        manifest = store.require_manifest(cfg, stage, fingerprint)
        plan.outcomes.append(StageOutcome(stage, "reused", 0.0, fingerprint))
        return manifest
    if stage in plan.refresh:
        _discard(final_dir)
    already_done = store.read_manifest(final_dir) is not None
    configured = stage_task.with_options(
        refresh_cache=not already_done,
        retries=getattr(cfg.retries, stage),
        retry_delay_seconds=cfg.retries.delay_seconds,
        tags=[GPU_TAG] if stage in GPU_STAGES else [],
    )
    state = configured(cfg, fingerprint, **upstream, return_state=True)
    manifest = state.result()
    cached = already_done or state.name == "Cached"
    plan.outcomes.append(StageOutcome(stage, "cached" if cached else "ran", round(time.monotonic() - started, 2), fingerprint))
    return manifest


def _discard(final_dir: Path) -> None:
    """Moves an output out of readers' sight first, then deletes it."""
    if final_dir.exists():
        doomed = final_dir.with_name(f"{final_dir.name}.discarded-{time.time_ns()}")
        final_dir.rename(doomed)
        shutil.rmtree(doomed)


@flow(name="loraflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(config_path: str, only: str | None = None, start_from: str | None = None, refresh: list[str] | None = None) -> dict:
    cfg = load_config(config_path)
    preflight(cfg, config_path)
    plan = StagePlan.build(only, start_from, refresh)
    hasher = FileHasher(Path(cfg.state_dir) / "file-hashes.json")

    with tags(f"config:{cfg.name}", f"model:{Path(cfg.base_model).name}", *(f"stage:{s}" for s in plan.selected)):
        prep_fp = prep.fingerprint(cfg, hasher)
        prep_manifest = run_stage(prep.prep_task, cfg, "prep", prep_fp, plan)

        train_fp = train.fingerprint(cfg, prep_fp, hasher)
        train_manifest = run_stage(train.train_task, cfg, "train", train_fp, plan, prep_fingerprint=prep_fp)

        eval_fp = eval_stage.fingerprint(cfg, prep_fp, train_fp, hasher)
        eval_manifest = run_stage(
            eval_stage.eval_task, cfg, "eval", eval_fp, plan, prep_fingerprint=prep_fp, train_fingerprint=train_fp
        )

        export_fp = export.fingerprint(cfg, train_fp, eval_fp)
        export_manifest = run_stage(
            export.export_task, cfg, "export", export_fp, plan,
            prep_fingerprint=prep_fp, train_fingerprint=train_fp, eval_fingerprint=eval_fp,
        )
        # Registers the export in the model registry and applies export.promote_if; never cached.
        promotion = export.promote_task(cfg, export_fp) if export_manifest else None

    hasher.save()
    model_link = export.link_output(cfg, store.stage_dir(cfg, "export", export_fp), export_manifest) if export_manifest else None
    return write_run_summary(cfg, plan.outcomes, prep_manifest, train_manifest, eval_manifest, export_manifest, model_link, promotion)


def write_run_summary(
    cfg: RunConfig,
    outcomes: list[StageOutcome],
    prep_manifest: dict | None,
    train_manifest: dict | None,
    eval_manifest: dict | None,
    export_manifest: dict | None,
    model_link: Path | None,
    promotion: dict | None,
) -> dict[str, Any]:
    def pick(manifest: dict | None, keys: tuple[str, ...]) -> dict | None:
        return {key: manifest.get(key) for key in keys} if manifest else None

    summary = {
        "config": cfg.name,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages": {outcome.stage: asdict(outcome) for outcome in outcomes},
        "prep": pick(prep_manifest, ("rows_in", "rows_accepted", "rows_quarantined", "packing_efficiency")),
        "train": pick(train_manifest, ("global_step", "train_loss", "eval_loss", "resumed_from_step")),
        "eval": eval_manifest["metrics"] if eval_manifest else None,
        "export_path": str(model_link) if model_link else None,
        "export": pick(export_manifest, ("kind", "merge_dtype", "max_logit_diff", "weights_changed", "gguf")),
        "promotion": pick(promotion, ("version", "promoted", "reason", "production", "production_before", "registry", "hub")),
        "trust_remote_code": cfg.trust_remote_code,
    }
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    store.write_json_atomic(output_dir / SUMMARY, summary)
    _summary_artifact(cfg, summary)
    return summary


def _summary_artifact(cfg: RunConfig, summary: dict[str, Any]) -> None:
    """One table per run under a stable key: the UI shows its history across nightly runs, and
    `loraflow runs` reads key metrics back from it."""
    from prefect.artifacts import create_table_artifact

    from tasks.progress import artifact_key

    rows = [
        {"stage": stage, "state": outcome["state"], "duration_s": outcome["duration_s"], "fingerprint": outcome["fingerprint"][:12]}
        for stage, outcome in summary["stages"].items()
    ]
    metrics = {f"{model}_{name}": value for model, values in (summary["eval"] or {}).items()
               for name, value in values.items() if name in ("accuracy", "exact_match")}
    create_table_artifact(
        table=rows,
        key=artifact_key(cfg.name, "run-summary"),
        description=" ".join(f"{name}={value:.4g}" for name, value in metrics.items()) or "no eval metrics in this run",
    )
