"""The pipeline flow: prep -> train -> eval -> export (-> promote).

Each stage is one Prefect task made from its declaration (`tasks/stages.py`) by the one stage
contract (`tasks/stage.py`): cached on its key, which hashes its settings, code, own inputs and the
*output digests* of the upstream manifests it consumes. The flow passes manifests from stage to
stage and records, per stage, whether it ran or came back cached and why ("ran: contracts
changed", "cached: upstream output unchanged"). A key whose output directory has gone missing is
re-run, whatever Prefect's result store remembers.

A run can be narrowed to some stages (`only`, `start_from`): the stages before them must already
have outputs for the current keys, and are reused, not re-run.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks import atomic, pictures, store, tracking
from tasks.config import RunConfig
from tasks.config_load import load_config
from tasks.errors import ConfigFamilyError, StageFailedError
from tasks.fingerprint import FileHasher, hash_bytes
from tasks.stage import Stage, prefect_task, remember, stage_key, why_ran
from tasks.stages import STAGES

SUMMARY = "run_summary.json"
# The stages log progress at INFO under `loraflow.*` (PREFECT_LOGGING_EXTRA_LOGGERS routes them to the
# UI); left at the root's WARNING, those lines would be dropped before any handler saw them.
logging.getLogger("loraflow").setLevel(logging.INFO)
log = logging.getLogger("loraflow.pipeline")
STAGE_TASKS = {name: prefect_task(stage) for name, stage in STAGES.items()}


class StageSelectionError(ConfigFamilyError):
    """`only`, `start_from` or `refresh` names a stage that does not exist."""


class StageTimeoutError(StageFailedError):
    """A stage ran past its `timeouts.<stage>` setting."""


@dataclass
class StageOutcome:
    stage: str
    state: str  # "ran", "cached", "reused" (upstream of the selected stages) or "skipped"
    reason: str
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

    def ran(self, stage: str) -> bool:
        return any(outcome.stage == stage and outcome.state == "ran" for outcome in self.outcomes)


def checked_config(config_path: str | Path, on_ray: bool = False) -> RunConfig:
    """The config, loaded and preflighted once per process and file content: the CLI checks it
    before starting Prefect, and the flow (also run by deployments) gets the same object back.
    `on_ray` (`--ray`, or the config's `ray:` section): the GPUs are the cluster's, not this machine's."""
    path = Path(config_path).resolve()
    return _checked_config(path, hash_bytes(path.read_bytes()) if path.is_file() else "", on_ray)


@functools.lru_cache(maxsize=32)
def _checked_config(path: Path, content_hash: str, on_ray: bool) -> RunConfig:
    from tasks.preflight import preflight

    cfg = load_config(path)
    for note in preflight(cfg, path, gpus_elsewhere=on_ray or cfg.ray is not None):
        log.info("note: %s", note)
    return cfg


def _run_name() -> str:
    config_name = Path(flow_run.parameters["config_path"]).stem
    return f"{config_name}-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"


def run_stage(cfg: RunConfig, stage: Stage, upstream: dict[str, dict | None], plan: StagePlan, hasher: FileHasher) -> dict | None:
    """One stage of the flow: skipped, reused, cached or run, as the plan and the key say."""
    if any(manifest is None for manifest in upstream.values()) or (
        stage.name not in plan.selected and store.STAGES.index(stage.name) > store.STAGES.index(plan.selected[-1])
    ):
        plan.outcomes.append(StageOutcome(stage.name, "skipped", "not selected", 0.0, ""))
        return None
    key = stage_key(stage, cfg, upstream, hasher)  # type: ignore[arg-type]
    final_dir = store.stage_dir(cfg, stage.name, key)
    if stage.name not in plan.selected:
        manifest = store.require_manifest(cfg, stage.name, key)
        plan.outcomes.append(StageOutcome(stage.name, "reused", "upstream of the selected stages", 0.0, key))
        return manifest
    if stage.name in plan.refresh:
        _discard(final_dir)
    started = time.monotonic()
    already_done = store.read_manifest(final_dir) is not None
    timeout = getattr(cfg.timeouts, stage.name)
    task = STAGE_TASKS[stage.name].with_options(
        refresh_cache=not already_done, retries=getattr(cfg.retries, stage.name), retry_delay_seconds=cfg.retries.delay_seconds,
        timeout_seconds=timeout,
    )
    if cfg.ray is not None:
        from flows.ray_cluster import run_on_cluster

        state = run_on_cluster(task, cfg, stage, key, upstream)
    else:
        state = task(cfg, key, upstream, return_state=True)
    try:
        if state.is_failed() and isinstance(error := state.result(raise_on_failure=False), TimeoutError) and timeout:
            raise StageTimeoutError(
                f"`{stage.name}` ran past `timeouts.{stage.name}: {timeout:g}` seconds and was stopped; raise "
                f"timeouts.{stage.name} in the config if the stage needs longer (a re-run resumes where it can)"
            ) from error
        manifest = state.result()
    except Exception as error:
        _alert_failure(cfg, stage.name, error)
        raise
    if already_done or state.name == "Cached":
        upstream_ran = any(plan.ran(name) for name in stage.upstream)
        state, reason = "cached", "upstream output unchanged" if upstream_ran else "inputs unchanged"
    else:
        state, reason = "ran", why_ran(cfg, manifest, refreshed=stage.name in plan.refresh)
    remember(cfg, manifest)
    plan.outcomes.append(StageOutcome(stage.name, state, reason, round(time.monotonic() - started, 2), key))
    log.info("%s: %s (%s)", stage.name, state, reason)
    return manifest


def _alert_failure(cfg: RunConfig, stage: str, error: Exception) -> None:
    """`budget_exceeded` for a spent eval budget when the config picks it, else `failed`."""
    from tasks.eval_client import BudgetExceededError
    from tasks.notify import send

    budget = isinstance(error, BudgetExceededError) and cfg.notify is not None and "budget_exceeded" in cfg.notify.events
    send(cfg, "budget_exceeded" if budget else "failed", stage, "Failed", f"{type(error).__name__}: {error}")


def _discard(final_dir: Path) -> None:
    """Moves an output out of readers' sight first, then deletes it."""
    if final_dir.exists():
        doomed = final_dir.with_name(f"{final_dir.name}.discarded-{time.time_ns()}")
        final_dir.rename(doomed)
        shutil.rmtree(doomed)


def smoke_config(cfg: RunConfig, rows: int) -> RunConfig:
    """The config cut down to a first try through every stage: the first `rows` rows of each source,
    a few steps, a small eval, in its own state, outputs and registry (production is never touched)."""
    state_dir = Path(cfg.state_dir) / "smoke"
    return cfg.model_copy(update={
        "name": f"{cfg.name}-smoke",
        "dataset_max_rows": rows,
        "max_steps": 5,
        "save_steps": None,
        "eval_steps": None,
        "logging_steps": 1,
        "state_dir": str(state_dir),
        "output_dir": str(Path(cfg.output_dir) / "smoke"),
        "eval": cfg.eval.model_copy(update={"max_samples": min(cfg.eval.max_samples, 16)}),
        "export": cfg.export.model_copy(update={"verify_prompts": min(cfg.export.verify_prompts, 2),
                                                "registry_dir": str(state_dir / "registry")}),
    })


@flow(name="loraflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(
    config_path: str, only: str | None = None, start_from: str | None = None, refresh: list[str] | None = None,
    smoke_rows: int | None = None, ray_address: str | None = None,
) -> dict:
    cfg = checked_config(config_path, on_ray=ray_address is not None)
    if smoke_rows:
        cfg = smoke_config(cfg, smoke_rows)
    if cfg.ray is not None or ray_address:
        from flows.ray_cluster import on_ray

        cfg = on_ray(cfg, ray_address)
    plan = StagePlan.build(only, start_from, refresh)
    hasher = FileHasher(Path(cfg.state_dir) / "file-hashes.json")

    with (tags(f"config:{cfg.name}", f"model:{Path(cfg.base_model).name}", *(f"stage:{s}" for s in plan.selected)),
          tracking.pipeline_run(cfg, str(flow_run.id), flow_run.name or cfg.name) as tracked):
        prep = run_stage(cfg, STAGES["prep"], {}, plan, hasher)
        train = run_stage(cfg, STAGES["train"], {"prep": prep}, plan, hasher)
        if cfg.machine_rank > 0:
            return _joined_training(cfg, plan, hasher, prep, train)
        evaluation = run_stage(cfg, STAGES["eval"], {"prep": prep, "train": train}, plan, hasher)
        export = run_stage(cfg, STAGES["export"], {"prep": prep, "train": train, "eval": evaluation}, plan, hasher)
        model_uri = tracked.log_model(store.output_dir(cfg, export), export) if tracked and export else None
        promotion = _promote(cfg, export, evaluation, model_uri) if export else None
        run_pictures = pictures.run_pictures(cfg, train, evaluation)
        pictures.publish(cfg, run_pictures)
        if tracked:
            tracked.log_outputs(train, evaluation, export, promotion, run_pictures, {o.stage: asdict(o) for o in plan.outcomes})

    hasher.save()
    return write_run_summary(cfg, plan.outcomes, prep, train, evaluation, export, promotion,
                             picture_paths={name: str(path) for name, path in run_pictures.items()},
                             tracking=tracked.status if tracked else None)


def _joined_training(cfg: RunConfig, plan: StagePlan, hasher: FileHasher, prep: dict | None, train: dict | None) -> dict:
    """Machines other than machine 0 of a multi-node run stop after training: machine 0 evaluates,
    exports and promotes what they trained together. Their summary goes beside machine 0's."""
    log.info("machine %d of %d: training done; machine 0 runs eval, export and promotion", cfg.machine_rank, cfg.num_machines)
    hasher.save()
    own_summary = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir) / f"machine-{cfg.machine_rank}")})
    return write_run_summary(own_summary, plan.outcomes, prep, train, None, None, None)


def _promote(cfg: RunConfig, export: dict, evaluation: dict | None = None, model_uri: str | None = None) -> dict:
    """Registers the export and applies the gate (never cached), and points output_dir/model at it.
    `model_uri`: the export as logged in MLflow, which `export.registry: mlflow` registers."""
    from tasks.export import link_output
    from tasks.promotion import promote_task

    link_output(cfg, store.output_dir(cfg, export), export)
    return promote_task(cfg, export, evaluation, model_uri)


def write_run_summary(
    cfg: RunConfig,
    outcomes: list[StageOutcome],
    prep_manifest: dict | None,
    train_manifest: dict | None,
    eval_manifest: dict | None,
    export_manifest: dict | None,
    promotion: dict | None,
    picture_paths: dict[str, str] | None = None,
    tracking: dict[str, str] | None = None,
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
        "export_path": str(Path(cfg.output_dir) / "model") if export_manifest else None,
        "export": pick(export_manifest, ("kind", "merge_dtype", "max_logit_diff", "weights_changed", "formats")),
        "loss_curve": str(store.output_dir(cfg, train_manifest) / train_manifest["loss_curve"]) if train_manifest else None,
        "pictures": picture_paths or {},
        "tracking": tracking or {},
        "promotion": pick(promotion, ("version", "promoted", "reason", "production", "production_before", "registry", "hub", "checks")),
        "trust_remote_code": cfg.trust_remote_code,
    }
    atomic.write_json(Path(cfg.output_dir) / SUMMARY, summary)
    _summary_artifact(cfg, summary)
    return summary


def _summary_artifact(cfg: RunConfig, summary: dict[str, Any]) -> None:
    """One table per run under a stable key: the UI shows its history across nightly runs, and
    `loraflow runs` reads key metrics back from it."""
    from prefect.artifacts import create_table_artifact

    from tasks.stage import artifact_key

    rows = [
        {"stage": stage, "state": outcome["state"], "reason": outcome["reason"], "duration_s": outcome["duration_s"],
         "fingerprint": outcome["fingerprint"][:12]}
        for stage, outcome in summary["stages"].items()
    ]
    metrics = {f"{model}_{name}": value for model, values in (summary["eval"] or {}).items()
               for name, value in values.items() if name in ("accuracy", "exact_match")}
    create_table_artifact(
        table=rows,
        key=artifact_key(cfg.name, "run-summary"),
        description=" ".join(f"{name}={value:.4g}" for name, value in metrics.items()) or "no eval metrics in this run",
    )
