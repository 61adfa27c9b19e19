"""The promotion gate: the items it compares on, production's scores on them, and the decision.

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
`evaluate_gate` decides from the conditions (`export.promote_if`): absolute bounds, and regressions
against production judged by a paired test on the same items. The registries apply the decision.
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

from tasks import atomic, significance, store
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


# ---------------------------------------------------------------- the decision


def metric_value(metrics: dict[str, Any], path: str) -> float | None:
    """`accuracy` -> the tuned model's accuracy (else a top-level `accuracy`); `base.accuracy` as written."""
    candidates = [path] if "." in path else [f"tuned.{path}", path]
    for candidate in candidates:
        value: Any = metrics
        for part in candidate.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def evaluate_gate(
    conditions: list[PromoteCondition], metrics: dict[str, Any], production_metrics: dict[str, Any] | None, production_name: str | None,
    candidate: GateItems | None = None, paired: tuple[GateItems, str] | None = None,
) -> dict[str, Any]:
    """Checks every condition; promoted only if all pass. With no production version yet only
    the absolute bounds apply; with no conditions every new version is promoted. A metric with
    per-item scores in `candidate` is read on those items, and compared with production's scores
    on the same items (`paired`: production's items and whether they were stored or re-scored)."""
    if not conditions:
        nothing_scored = "" if metrics.get("tuned") else " (eval scored nothing, so the gate has nothing to compare)"
        return {"promoted": True, "reason": f"no promote_if conditions: every new version is promoted{nothing_scored}", "checks": []}
    checks = [_check(condition, metrics, production_metrics, production_name, candidate, paired) for condition in conditions]
    failed = [check["detail"] for check in checks if not check["passed"]]
    if failed:
        return {"promoted": False, "reason": "not promoted: " + "; ".join(failed), "checks": checks}
    return {"promoted": True, "reason": "promoted: " + "; ".join(check["detail"] for check in checks), "checks": checks}


def _check(
    condition: PromoteCondition, metrics: dict[str, Any], production_metrics: dict[str, Any] | None, production_name: str | None,
    candidate: GateItems | None = None, paired: tuple[GateItems, str] | None = None,
) -> dict[str, Any]:
    candidate_values = candidate.values(condition.metric) if candidate is not None else None
    if candidate_values is not None:
        return _paired_check(condition, candidate, candidate_values, paired, production_metrics, production_name)
    value = metric_value(metrics, condition.metric)
    check: dict[str, Any] = {"metric": condition.metric, "value": value, "production_value": None, "passed": True}
    if value is None and not metrics.get("tuned"):
        return {**check, "passed": False,
                "detail": "eval scored nothing (no val split and no eval.test_set): the gate has nothing to compare"}
    if value is None:
        known = ", ".join(sorted(_metric_names(metrics)))
        return {**check, "passed": False, "detail": f"metric `{condition.metric}` is not in the eval metrics (known: {known})"}
    details = _absolute_bounds(condition, value, check)
    if condition.max_regression is not None:
        previous = metric_value(production_metrics, condition.metric) if production_metrics is not None else None
        check["production_value"] = previous
        if previous is None:
            reason = "no production version yet" if production_metrics is None else f"{production_name} has no {condition.metric}"
            details.append(f"{reason}: regression check on {condition.metric} skipped")
        else:
            regression = previous - value if condition.higher_is_better else value - previous
            within = regression <= condition.max_regression + 1e-12
            check["passed"] &= within
            details.append(
                f"{condition.metric} {value:.4g} vs {previous:.4g} in production {production_name} "
                f"({'within' if within else 'beyond'} max_regression {condition.max_regression:g})"
            )
    if condition.min_improvement is not None:
        previous = metric_value(production_metrics, condition.metric) if production_metrics is not None else None
        check["production_value"] = previous
        if previous is None:
            details.append(f"no production {condition.metric} to improve on: improvement check skipped")
        else:
            improvement = value - previous if condition.higher_is_better else previous - value
            check["passed"] &= improvement > condition.min_improvement
            details.append(f"{condition.metric} {value:.4g} vs {previous:.4g} in production {production_name} "
                           f"({'above' if improvement > condition.min_improvement else 'not above'} min_improvement "
                           f"{condition.min_improvement:g})")
    check["passed"] = bool(check["passed"])
    return {**check, "detail": ", ".join(details)}


def _absolute_bounds(condition: PromoteCondition, value: float, check: dict[str, Any], where: str = "") -> list[str]:
    """`min` and `max` on the candidate's value: updates `check["passed"]`, returns the details."""
    details = []
    if condition.min is not None:
        check["passed"] &= value >= condition.min
        details.append(f"{condition.metric} {value:.4g} {'>=' if value >= condition.min else '<'} min {condition.min:g}{where}")
    if condition.max is not None:
        check["passed"] &= value <= condition.max
        details.append(f"{condition.metric} {value:.4g} {'<=' if value <= condition.max else '>'} max {condition.max:g}{where}")
    return details


def _paired_check(
    condition: PromoteCondition, candidate: GateItems, values: list[float], paired: tuple[GateItems, str] | None,
    production_metrics: dict[str, Any] | None, production_name: str | None,
) -> dict[str, Any]:
    """A per-item metric on the gate's items: absolute bounds on the candidate's mean, and
    `min_improvement` / `max_regression` against production's scores on the same items, with a
    paired test at `confidence` when set (the interval decides), else on the bare difference."""
    value = sum(values) / len(values)
    where = f"on the same {len(values)} {candidate.kind.replace('_', ' ')} items"
    check: dict[str, Any] = {"metric": condition.metric, "value": round(value, 6), "production_value": None, "passed": True,
                             "items": len(values), "items_kind": candidate.kind, "items_sha256": candidate.items_sha256,
                             "settings": candidate.settings}
    details = _absolute_bounds(condition, value, check, f" ({candidate.kind})")
    relative = condition.min_improvement is not None or condition.max_regression is not None
    if relative and paired is None:
        details.append("no production version yet: comparison skipped" if production_metrics is None
                       else f"{production_name} could not be compared: comparison skipped")
    elif relative and paired is not None:
        production_items, how = paired
        previous = production_items.values(condition.metric) or []
        sign = 1 if condition.higher_is_better else -1
        if condition.confidence is not None:
            comparison = significance.compare(values, previous, condition.confidence, condition.test)
            difference = comparison.difference
            low, high = sorted((sign * comparison.low, sign * comparison.high))
            check.update(comparison.as_record())
            shown = (f"difference {sign * difference:+.4g}, {condition.confidence:.0%} interval [{low:+.4g}, {high:+.4g}]"
                     + (f", McNemar p={comparison.p_value:.3g}" if comparison.p_value is not None else ", paired bootstrap"))
        else:
            difference = value - sum(previous) / len(previous)
            low = high = sign * difference
            check.update(items=len(values), candidate=round(value, 6), production=round(sum(previous) / len(previous), 6),
                         difference=round(difference, 6), interval=None, confidence=None)
            shown = f"difference {sign * difference:+.4g}"
        production_value = sum(previous) / len(previous)
        check.update(production_value=round(production_value, 6), production_scores=how)
        details.append(f"{condition.metric} {value:.4g} vs {production_value:.4g} in production {production_name} {where} "
                       f"({how}): {shown}")
        if condition.min_improvement is not None:
            better = low > condition.min_improvement
            check["passed"] &= better
            kind = "significant " if condition.confidence is not None else ""
            details.append(f"{'a' if better else 'not a'} {kind}improvement above min_improvement {condition.min_improvement:g}")
        if condition.max_regression is not None:
            worse = high < -condition.max_regression
            check["passed"] &= not worse
            if condition.confidence is not None:
                details.append(f"{'significantly' if worse else 'not significantly'} beyond max_regression {condition.max_regression:g}")
            else:
                details.append(f"{'beyond' if worse else 'within'} max_regression {condition.max_regression:g}")
    check["passed"] = bool(check["passed"])
    return {**check, "detail": ", ".join(details)}


def _metric_names(metrics: dict[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in metrics.items():
        if isinstance(value, dict):
            names |= _metric_names(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            names.add(prefix + key)
    return names
