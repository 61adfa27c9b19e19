"""The pipeline flow: prep -> train -> eval -> export.

Each stage is a Prefect task cached on its content fingerprint. The flow computes the fingerprints
(cheap: file hashes are memoised), asks each task for its manifest, and records what ran and what
came back cached. A fingerprint whose output directory has gone missing is re-run, whatever
Prefect's result store remembers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks import eval as eval_stage
from tasks import export, prep, store, train
from tasks.config import RunConfig, load_config
from tasks.fingerprint import FileHasher
from tasks.preflight import preflight

SUMMARY = "run_summary.json"


@dataclass
class StageOutcome:
    stage: str
    state: str  # "ran" or "cached"
    duration_s: float
    fingerprint: str


def _run_name() -> str:
    config_name = Path(flow_run.parameters["config_path"]).stem
    return f"{config_name}-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"


def run_stage(stage_task: Any, cfg: RunConfig, stage: str, fingerprint: str, outcomes: list[StageOutcome], **upstream: str) -> dict:
    already_done = store.read_manifest(store.stage_dir(cfg, stage, fingerprint)) is not None
    started = time.monotonic()
    state = stage_task.with_options(refresh_cache=not already_done)(cfg, fingerprint, **upstream, return_state=True)
    manifest = state.result()
    cached = already_done or state.name == "Cached"
    outcomes.append(StageOutcome(stage, "cached" if cached else "ran", round(time.monotonic() - started, 2), fingerprint))
    return manifest


@flow(name="loraflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(config_path: str) -> dict[str, Any]:
    cfg = load_config(config_path)
    preflight(cfg, config_path)
    hasher = FileHasher(Path(cfg.state_dir) / "file-hashes.json")
    outcomes: list[StageOutcome] = []

    prep_fp = prep.fingerprint(cfg, hasher)
    prep_manifest = run_stage(prep.prep_task, cfg, "prep", prep_fp, outcomes)

    train_fp = train.fingerprint(cfg, prep_fp, hasher)
    train_manifest = run_stage(train.train_task, cfg, "train", train_fp, outcomes, prep_fingerprint=prep_fp)

    eval_fp = eval_stage.fingerprint(cfg, prep_fp, train_fp, hasher)
    eval_manifest = run_stage(
        eval_stage.eval_task, cfg, "eval", eval_fp, outcomes, prep_fingerprint=prep_fp, train_fingerprint=train_fp
    )

    export_fp = export.fingerprint(cfg, train_fp, eval_fp)
    export_manifest = run_stage(
        export.export_task, cfg, "export", export_fp, outcomes,
        prep_fingerprint=prep_fp, train_fingerprint=train_fp, eval_fingerprint=eval_fp,
    )
    model_link = export.link_output(cfg, store.stage_dir(cfg, "export", export_fp), export_manifest)

    hasher.save()
    return write_run_summary(cfg, outcomes, prep_manifest, train_manifest, eval_manifest, model_link)


def write_run_summary(
    cfg: RunConfig, outcomes: list[StageOutcome], prep_manifest: dict, train_manifest: dict, eval_manifest: dict, model_link: Path
) -> dict[str, Any]:
    summary = {
        "config": cfg.name,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages": {outcome.stage: asdict(outcome) for outcome in outcomes},
        "prep": {key: prep_manifest[key] for key in ("rows_in", "rows_accepted", "rows_quarantined", "packing_efficiency")},
        "train": {key: train_manifest[key] for key in ("global_step", "train_loss", "eval_loss", "resumed_from_step")},
        "eval": eval_manifest["metrics"],
        "export_path": str(model_link),
        "trust_remote_code": cfg.trust_remote_code,
    }
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    store.write_json_atomic(output_dir / SUMMARY, summary)
    return summary
