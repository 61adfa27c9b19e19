"""The items the promotion gate compares on, and production's scores on them.

Tonight's candidate and production must be scored on the **same items with the same settings**,
or the gate compares two different tests (a lucky split promotes a worse model). The items are the
pinned test set (`eval.test_set`) when there is one, else tonight's val items; the settings are the
eval settings' fingerprint (the eval manifest's `key_parts["settings"]`).

Per-item scores live in each registry version, one file per (items, settings):
`versions/vNNNN/scores/<items>-<settings>.json`. The candidate's come from its eval output. When
production has none for tonight's items and settings, `score_production` serves production's
registered model with `transformers serve` on 127.0.0.1 and asks it through the eval client (the
response cache keys on the version, the prompts and the sampling settings, so asking again costs
nothing), scores the answers exactly as eval does, and stores the result in production's version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import atomic, store
from tasks.config import RunConfig
from tasks.config_sections import PromoteCondition

log = logging.getLogger("loraflow.gate")

SCORES = "scores"


@dataclass
class GateItems:
    """Scored items of one model: which items (`kind`, `items_sha256`), with which eval settings."""

    kind: str  # "test_set" or "val"
    items_sha256: str
    settings: str
    items: list[dict[str, Any]]  # {"prompt": messages, "reference": text}
    scores: list[dict[str, float]]  # per item: exact_match, rouge_l, accuracy, ...

    @property
    def key(self) -> str:
        return f"{self.items_sha256[:16]}-{self.settings[:16]}"

    def values(self, metric: str) -> list[float] | None:
        """Per-item values of a metric (`accuracy`, `tuned.accuracy`), None if it has none."""
        name = metric.removeprefix("tuned.")
        if "." in name or not self.scores or any(name not in item for item in self.scores):
            return None
        return [float(item[name]) for item in self.scores]


def candidate_items(cfg: RunConfig, eval_manifest: dict[str, Any] | None) -> GateItems | None:
    """The tuned model's per-item scores from its eval output: on the test set if there is one,
    else on the val items. None for an eval output that predates per-item gate scores."""
    if eval_manifest is None:
        return None
    test_set = eval_manifest.get("test_set")
    if test_set:
        kind, samples_file, digest = "test_set", test_set["samples_file"], test_set["items_sha256"]
    elif eval_manifest.get("items_sha256"):
        kind, samples_file, digest = "val", eval_manifest["samples_file"], eval_manifest["items_sha256"]
    else:
        return None
    records = _read_jsonl(store.output_dir(cfg, eval_manifest) / samples_file)
    return GateItems(
        kind=kind, items_sha256=digest, settings=eval_manifest["key_parts"]["settings"],
        items=[{"prompt": record["prompt"], "reference": record["reference"]} for record in records],
        scores=[record["tuned_scores"] for record in records],
    )


def needs_production(conditions: list[PromoteCondition]) -> bool:
    return any(condition.min_improvement is not None or condition.max_regression is not None for condition in conditions)


def stored_scores(version_path: Path, items: GateItems) -> list[dict[str, float]] | None:
    path = version_path / SCORES / f"{items.key}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["scores"]


def store_scores(version_path: Path, items: GateItems, scores: list[dict[str, float]]) -> None:
    record = {"kind": items.kind, "items_sha256": items.items_sha256, "settings": items.settings, "scores": scores}
    atomic.write_json(version_path / SCORES / f"{items.key}.json", record)


ProductionScorer = Callable[[RunConfig, Any, GateItems], list[dict[str, float]]]


def production_items(cfg: RunConfig, version: Any, candidate: GateItems, scorer: ProductionScorer | None = None) -> tuple[GateItems, str]:
    """Production's scores on the candidate's items and settings: stored ones, or scored now (and
    stored). Returns them and how they were obtained ("stored" or "re-scored")."""
    scores = stored_scores(version.path, candidate)
    how = "stored"
    if scores is None:
        log.info("gate: %s has no scores on these %d %s items with these settings; scoring it now", version.name,
                 len(candidate.items), candidate.kind)
        scores = (scorer or score_production)(cfg, version, candidate)
        store_scores(version.path, candidate, scores)
        how = "re-scored"
    return dataclasses.replace(candidate, scores=scores), how


def score_production(cfg: RunConfig, version: Any, candidate: GateItems) -> list[dict[str, float]]:
    """Serves a registered version locally (`transformers serve`) and scores it on the items with
    the run's eval settings, through the same client, cache and scoring as eval."""
    from tasks.eval import _merge_for_serving, sampling
    from tasks.eval_client import ModelTarget, ask_all, count_missing
    from tasks.eval_metrics import score
    from tasks.serving import transformers_serve

    settings = cfg.eval
    cache_dir = Path(cfg.state_dir) / "response_cache"
    prompts = [item["prompt"] for item in candidate.items]
    with tempfile.TemporaryDirectory(prefix=f"loraflow-gate-{version.name}-") as scratch:
        model_dir = version.path / "model"
        if version.record.get("kind") == "adapter":
            # An adapter-only version is served merged into this config's base model.
            model_dir = Path(scratch) / "merged"
            _merge_for_serving(cfg, version.path / "model", model_dir)
        target = ModelTarget("production", str(model_dir.resolve()), f"registry:{version.record['fingerprint']}")
        if count_missing(target, prompts, sampling(settings), cache_dir) == 0:
            answers = ask_all(target, prompts, sampling(settings), settings, cache_dir)
        else:
            with transformers_serve(Path(scratch) / "server.log", settings.startup_timeout) as base_url:
                answers = ask_all(dataclasses.replace(target, base_url=base_url), prompts, sampling(settings), settings, cache_dir)
    return [score(answer.text, item["reference"], settings) for answer, item in zip(answers, candidate.items)]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
