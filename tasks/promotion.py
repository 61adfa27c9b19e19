"""promote: the uncached last step. Registers the export as a registry version and applies the
gate (`export.promote_if`) on the candidate's and production's scores on the same items (see
`tasks/registry.py` and `tasks/gate.py`), then sends the `promoted` / `not_promoted` alert."""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import gate, notify, registry, store
from tasks.config import RunConfig

log = logging.getLogger("loraflow.promote")


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    cfg: RunConfig, export_manifest: dict[str, Any], eval_manifest: dict[str, Any] | None = None, model_uri: str | None = None,
) -> dict[str, Any]:
    """Registers the export as a registry version and applies `export.promote_if` (never cached:
    the decision depends on the current production version). With the eval manifest, the gate
    compares on the items it scored (the pinned test set, else the val items). `model_uri`: the
    export logged in MLflow, registered by `export.registry: mlflow`."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.stage import artifact_key

    candidate = gate.candidate_items(cfg, eval_manifest)
    decision = registry.register_and_gate(cfg, store.output_dir(cfg, export_manifest), export_manifest, candidate, model_uri=model_uri)
    create_markdown_artifact(
        markdown=registry.decision_markdown(decision), key=artifact_key(cfg.name, "promotion"), description="Promotion gate decision"
    )
    log.info("promote: %s", decision["reason"])
    if not decision.get("already_decided"):  # a cached re-run decides nothing new: no repeated alert
        event = "promoted" if decision["promoted"] else "not_promoted"
        notify.send(cfg, event, "promote", event, decision["reason"], key_metrics(decision))
    return decision


def key_metrics(decision: dict[str, Any]) -> dict[str, Any]:
    """What an alert shows of a decision: the version, and per checked metric both scores, the
    difference, its interval and the number of items."""
    fields = ("value", "production_value", "difference", "interval", "confidence", "items", "items_kind", "method", "p_value")
    return {
        "version": decision.get("version"),
        "production_before": decision.get("production_before"),
        "checks": {check["metric"]: {name: check[name] for name in fields if name in check} for check in decision.get("checks", [])},
    }
