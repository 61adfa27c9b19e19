"""Task metrics of eval: exact match, label accuracy, ROUGE-L, latency percentiles, tokens, cost.

Plain functions on strings and numbers, no model and no network, so each is pinned by tests with
hand-computed values. The rules hold for English, for CJK (Chinese, Japanese) and for mixed text:

- **Normalisation** (`normalise`): Unicode NFKC first, always, so full-width letters, digits,
  punctuation and the ideographic space (`，` `：` `（` `Ａ` `１` U+3000) compare equal to their
  ASCII forms; it leaves ASCII text unchanged. Then, as configured, lowercase, collapse whitespace
  and strip the punctuation *around* the text: ASCII marks and quotes as before plus CJK ones
  (`。` `、` `「」` `『』` `【】` `《》` `“”` ...), so `正面。` equals `正面`. Marks that carry
  meaning at the end of an answer (`%`, `-`, `#`, `/`) are kept.
- **ROUGE-L** (`rouge_l`, `rouge_tokens`): F1 of the longest common subsequence over tokens, where
  a token is one CJK character (Han ideographs, kana) or a run of other word characters (letters,
  digits); punctuation and spaces separate tokens and never count. English therefore scores over
  words as before, Chinese over characters. Characters rather than a word segmenter such as
  `jieba`: no extra dependency (jieba is a 20 MB dictionary), deterministic (a segmenter's output
  changes with its dictionary version, and a metric must not), robust to the segmenter's errors on
  financial jargon, and the common practice for Chinese ROUGE on short answers (character-level
  ROUGE is what Chinese summarisation benchmarks such as LCSTS and CLUE report).
- **Label accuracy** (`named_labels`): a reply names a label when the label occurs with a boundary
  on each side: text edge, a non-word character, or a CJK character on either side of the edge
  (CJK text has no spaces, so `该新闻为正面` names `正面`, while `nonpositive` still does not
  name `positive`). A label found inside a longer label's match counts as the longer one only.
  A reply naming two labels (`正面还是负面`, `positive, not negative`) names no single label and
  is wrong. Without a segmenter a CJK label is matched as a substring: a reply in which the label's
  characters happen to appear inside another word (`正面临`) names it too.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Sequence
from typing import Any

from tasks.config import EvalConfig

# After NFKC, full-width marks (，：！？（）) are already ASCII; the CJK marks NFKC keeps are listed.
_SURROUNDING_PUNCTUATION = " .!?,;:\"'`()[]{}*" + "。、｡「」『』【】〔〕〖〗《》〈〉“”‘’・·…"

# One token each for ROUGE-L, and no word boundary needed around them for label matching: kana
# (not the katakana middle dot ・), Han ideographs (extension A, the unified block, compatibility
# ideographs, extensions B-G).
_CJK = "\u3040-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK_CHARACTER = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])\\w)+")


def normalise(text: str, rules: EvalConfig.Normalisation) -> str:
    """NFKC, then the configured rules (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).strip()
    if rules.lowercase:
        text = text.lower()
    if rules.collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if rules.strip_punctuation:
        text = text.strip(_SURROUNDING_PUNCTUATION)
    return text


def rouge_tokens(text: str) -> list[str]:
    """ROUGE-L's tokens: each CJK character alone, other words whole, punctuation and spaces dropped:
    `净利润增长20%, as expected` -> 净 利 润 增 长 20 as expected."""
    return _ROUGE_TOKEN.findall(text)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over `rouge_tokens`: the longest common subsequence `lcs` gives precision
    lcs/len(prediction) and recall lcs/len(reference). Two texts without tokens agree fully (1.0)."""
    predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
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
        labels = [normalise(label, rules) for label in settings.labels]
        scores["accuracy"] = float(named_labels(predicted, labels) == {wanted})
    return scores


def named_labels(reply: str, labels: Sequence[str]) -> set[str]:
    """The labels a (normalised) reply names, by the boundary rule of the module docstring; longer
    labels are matched first and a shorter one inside their match does not count."""
    taken = [False] * len(reply)
    named = set()
    for label in sorted({label for label in labels if label}, key=lambda label: (-len(label), label)):
        for found in re.finditer(re.escape(label), reply):
            start, end = found.span()
            if any(taken[start:end]) or not (_boundary(reply, start - 1, start) and _boundary(reply, end - 1, end)):
                continue
            named.add(label)
            taken[start:end] = [True] * (end - start)
    return named


def _boundary(text: str, left: int, right: int) -> bool:
    """Whether a label may begin or end between text[left] and text[right]: at the text's edge, next
    to a non-word character, or where either side is CJK (written without spaces)."""
    if left < 0 or right >= len(text):
        return True
    before, after = text[left], text[right]
    if not (before.isalnum() or before == "_") or not (after.isalnum() or after == "_"):
        return True
    return bool(_CJK_CHARACTER.match(before) or _CJK_CHARACTER.match(after))


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
