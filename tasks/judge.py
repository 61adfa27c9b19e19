"""LLM judge: a pairwise tuned-vs-base comparison by any OpenAI-compatible model.

Each item is judged twice, once with the tuned answer as A and once with it as B, so a judge that
prefers a position cannot move the result. An item is a **win** only when the judge prefers the
tuned answer in both orders, a **loss** only when it prefers the base answer in both; everything
else (tie, orders that disagree, a verdict that cannot be read) is a tie.
`win_rate = (wins + 0.5 * ties) / comparisons`. Identical answers are a tie without asking.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.config import EvalConfig
from tasks.eval_client import Answer, Messages, ModelTarget, ask_all

_VERDICT = re.compile(r"\[\[\s*(a|b|tie)\s*\]\]|^\W*(?:answer\s+)?(a|b|tie)\b", re.IGNORECASE)


def judge_messages(rubric: str, prompt: Messages, reference: str, answer_a: str, answer_b: str) -> Messages:
    conversation = "\n".join(f"{message['role']}: {message['content']}" for message in prompt)
    return [
        {
            "role": "system",
            "content": f"You are an impartial judge comparing two answers to the same conversation. {rubric} "
            "Reply with exactly one word: A, B or tie.",
        },
        {
            "role": "user",
            "content": f"Conversation:\n{conversation}\n\nReference answer:\n{reference}\n\n"
            f"Answer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\nWhich answer is better? Reply A, B or tie.",
        },
    ]


def parse_verdict(reply: str) -> str | None:
    """`A`, `B` or `tie` from a judge's reply (a leading word, or `[[A]]` anywhere); None if unreadable."""
    match = _VERDICT.search(reply.strip())
    if match is None:
        return None
    verdict = (match.group(1) or match.group(2)).lower()
    return "tie" if verdict == "tie" else verdict.upper()


def outcome(tuned_first: str | None, base_first: str | None) -> str:
    """`win`, `loss` or `tie` for the tuned model from the verdicts of both orders (tuned as A,
    then tuned as B)."""
    preferred_first = {"A": "tuned", "B": "base"}.get(tuned_first or "")
    preferred_second = {"A": "base", "B": "tuned"}.get(base_first or "")
    if preferred_first == preferred_second == "tuned":
        return "win"
    if preferred_first == preferred_second == "base":
        return "loss"
    return "tie"


def judge_pairs(
    items: list[dict[str, Any]], tuned: list[Answer], base: list[Answer], judge: EvalConfig.Judge, target: ModelTarget,
    settings: EvalConfig, cache_dir: Path,
) -> tuple[list[dict[str, Any]], list[Answer]]:
    """Per item: both verdicts and the outcome; and the judge's answers (for tokens and cost)."""
    differing = [index for index, (t, b) in enumerate(zip(tuned, base)) if t.text.strip() != b.text.strip()]
    prompts = []
    for index in differing:
        item = items[index]
        prompts.append(judge_messages(judge.rubric, item["prompt"], item["reference"], tuned[index].text, base[index].text))
        prompts.append(judge_messages(judge.rubric, item["prompt"], item["reference"], base[index].text, tuned[index].text))
    replies = ask_all(target, prompts, {"max_tokens": judge.max_tokens, "temperature": 0.0}, settings, cache_dir)
    verdicts: list[dict[str, Any]] = [{"tuned_first": None, "base_first": None, "outcome": "tie", "identical": True} for _ in items]
    for position, index in enumerate(differing):
        tuned_first, base_first = parse_verdict(replies[2 * position].text), parse_verdict(replies[2 * position + 1].text)
        verdicts[index] = {
            "tuned_first": tuned_first, "base_first": base_first, "outcome": outcome(tuned_first, base_first), "identical": False,
        }
    return verdicts, replies


def win_rate_summary(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = Counter(verdict["outcome"] for verdict in verdicts)
    judged = [verdict for verdict in verdicts if not verdict["identical"]]
    return {
        "comparisons": len(verdicts),
        "wins": outcomes["win"],
        "losses": outcomes["loss"],
        "ties": outcomes["tie"],
        "identical_answers": len(verdicts) - len(judged),
        "inconsistent": sum(1 for v in judged if v["tuned_first"] and v["base_first"] and v["outcome"] == "tie"
                            and "tie" not in (v["tuned_first"], v["base_first"])),
        "unreadable_verdicts": sum((v["tuned_first"] is None) + (v["base_first"] is None) for v in judged),
        "win_rate": round((outcomes["win"] + 0.5 * outcomes["tie"]) / len(verdicts), 6) if verdicts else None,
    }
