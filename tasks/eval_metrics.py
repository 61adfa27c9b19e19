"""Task metrics of eval: exact match, label accuracy, ROUGE-L, latency percentiles, tokens, cost.

Plain functions on strings and numbers, no model and no network, so each is pinned by tests with
hand-computed values.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from typing import Any

from tasks.config import EvalConfig

_SURROUNDING_PUNCTUATION = " .!?,;:\"'`()[]{}*"


def normalise(text: str, rules: EvalConfig.Normalisation) -> str:
    text = text.strip()
    if rules.lowercase:
        text = text.lower()
    if rules.collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if rules.strip_punctuation:
        text = text.strip(_SURROUNDING_PUNCTUATION)
    return text


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens: the longest common subsequence `lcs` gives precision
    lcs/len(prediction) and recall lcs/len(reference). Two empty texts agree fully (1.0)."""
    predicted, wanted = prediction.split(), reference.split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = _lcs_length(predicted, wanted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for index, other in enumerate(second):
            current.append(previous[index] + 1 if token == other else max(previous[index + 1], current[index]))
        previous = current
    return previous[-1]


def score(prediction: str, reference: str, settings: EvalConfig) -> dict[str, float]:
    """Exact match and ROUGE-L after normalisation; with a closed label set (`eval.labels`),
    accuracy counts a reply that names exactly one label, the right one (so "positive, not
    negative" is wrong)."""
    rules = settings.normalisation
    predicted, wanted = normalise(prediction, rules), normalise(reference, rules)
    scores = {"exact_match": float(predicted == wanted), "rouge_l": round(rouge_l(predicted, wanted), 6)}
    if settings.labels:
        named = {
            label for label in (normalise(label, rules) for label in settings.labels)
            if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", predicted)
        }
        scores["accuracy"] = float(named == {wanted})
    return scores


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least `percent`% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def cost_usd(prices: dict[str, EvalConfig.Price], names: Sequence[str], prompt_tokens: int, completion_tokens: int) -> float:
    """Cost from the price table, looked up by the first of `names` it lists (model name, then
    role); a model it does not list (a local one) costs nothing."""
    price = next((prices[name] for name in names if name in prices), None)
    if price is None:
        return 0.0
    return (prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million) / 1_000_000


def summarise(
    scores: list[dict[str, float]], latencies_s: list[float], prompt_tokens: int, completion_tokens: int, cost: float
) -> dict[str, Any]:
    """One model's summary: mean of each score, latency percentiles, tokens and cost."""
    summary: dict[str, Any] = {name: round(statistics.fmean(s[name] for s in scores), 6) for name in scores[0]}
    summary["samples"] = len(scores)
    summary.update(usage_summary(latencies_s, prompt_tokens, completion_tokens, cost))
    return summary


def usage_summary(latencies_s: list[float], prompt_tokens: int, completion_tokens: int, cost: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        f"latency_p{p}_s": round(value, 4) if (value := percentile(latencies_s, p)) is not None else None for p in (50, 95, 99)
    }
    summary.update({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cost_usd": round(cost, 6)})
    return summary
