"""Eval's client against a real OpenAI-compatible server on 127.0.0.1 (tests/eval_fault_server.py)
that answers with 429 + Retry-After, 500, stalled responses and dropped connections, and counts
what reaches it. Nothing is mocked: the real `openai` client, real sockets, real cache files.

- every item completes with the right answer under each fault, and no item is counted twice;
- `Retry-After` is honoured; concurrency stays within `eval.concurrency`;
- retries exhausted: a clear error, the answers that arrived are kept, a re-run asks for the rest;
- kill -9 half-way, run again: only the missing items are requested, and the report equals an
  uninterrupted run's;
- the LLM judge asks both orders and a position-biased judge cannot win;
- an API key echoed by the server never reaches our error message.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_fault_server import Faults, FaultServer, last_word_responder, prompt_key

from tasks.config import EvalConfig
from tasks.eval import evaluate, sampling, write_outputs
from tasks.eval_client import EvalRequestError, ModelTarget, ResponseCache, ask_all, cache_path

REPO = Path(__file__).resolve().parents[1]
LABELS = ["positive", "negative", "neutral"]


def make_items(count: int) -> list[dict]:
    """Prompts end with their label, which the server's `tuned` model answers and `base` does not."""
    return [
        {"prompt": [{"role": "user", "content": f"Headline number {i}: shares move. Label: {LABELS[i % 3]}"}], "reference": LABELS[i % 3]}
        for i in range(count)
    ]


def targets(server: FaultServer, key: str = "test-key") -> list[ModelTarget]:
    return [
        ModelTarget("tuned", "tuned-model", "tuned-fp", server.base_url, key),
        ModelTarget("base", "base-model", "base-fp", server.base_url, key),
    ]


def cache_lines(cache_dir: Path, target: ModelTarget) -> list[dict]:
    """Complete lines only: the file may be read while a line is being appended."""
    path = cache_path(cache_dir, target)
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def fault_of(faults: Faults, model: str, item: dict) -> str | None:
    return faults.kind_for(prompt_key(model, item["prompt"]))


def without_timings(report: dict) -> dict:
    """The report minus wall-clock measurements and what this particular run requested."""
    kept = {key: value for key, value in report.items() if key != "this_run"}
    kept["metrics"] = {
        role: {k: v for k, v in summary.items() if not k.startswith("latency_")} for role, summary in report["metrics"].items()
    }
    return kept


@pytest.mark.parametrize("fault", ["rate_limit", "server_error", "stall", "drop"])
def test_every_item_completes_once_under_each_fault(fault, tmp_path):
    items = make_items(12)
    # A stall (8 s) is far past the timeout (3 s), and a healthy answer far below it even on a loaded
    # machine: each request is counted exactly, as a timeout or as an answer, never in between.
    settings = EvalConfig(labels=LABELS, concurrency=4, request_timeout=3.0, max_retries=3)
    faults = Faults(**{fault: 0.5}, failing_attempts=2, stall_s=8.0)
    with FaultServer(faults=faults) as server:
        report, records = evaluate(items, targets(server)[:1], settings, tmp_path)
        failed_first = [item for item in items if fault_of(faults, "tuned-model", item) == fault]
        assert failed_first, "the fault fraction hit no prompt: the test would prove nothing"
        for item in items:
            expected = 3 if item in failed_first else 1  # two failures, then the answer
            assert server.requests_for("tuned-model", item["prompt"]) == expected
        assert server.faults_sent[fault] == 2 * len(failed_first)
    assert report["metrics"]["tuned"]["accuracy"] == 1.0
    assert [r["tuned_answer"] for r in records] == [item["reference"] for item in items]
    assert report["samples"] == len(records) == len(items)
    assert report["this_run"]["tuned"] == {"requests": 12, "from_cache": 0, "retries": 2 * len(failed_first), "cost_usd": 0.0}
    assert len(cache_lines(tmp_path, targets(server)[0])) == len(items)


def test_mixed_faults_and_duplicate_prompts_count_each_item_once(tmp_path):
    items = make_items(30)
    items += [items[0], items[4]]  # the same question twice in the val split: asked once, scored twice
    settings = EvalConfig(labels=LABELS, concurrency=6, request_timeout=3.0, max_retries=4)
    faults = Faults(rate_limit=0.2, server_error=0.2, stall=0.15, drop=0.2, stall_s=8.0)
    with FaultServer(faults=faults) as server:
        report, records = evaluate(items, targets(server), settings, tmp_path)
        assert sum(server.faults_sent.values()) >= 20
        stalled = [item for item in items[:30] if fault_of(faults, "tuned-model", item) == "stall"]
        assert stalled and all(server.requests_for("tuned-model", item["prompt"]) == 2 for item in stalled)
    write_outputs(tmp_path / "out", report, records)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(32))
    assert all(s["tuned_answer"] == s["reference"] and s["base_answer"] == "unsure" for s in samples)
    assert {"prompt", "reference", "tuned_answer", "base_answer", "tuned_scores", "base_scores"} <= set(samples[0])
    assert report["metrics"]["tuned"]["samples"] == report["metrics"]["base"]["samples"] == 32
    assert (report["metrics"]["tuned"]["accuracy"], report["metrics"]["base"]["accuracy"]) == (1.0, 0.0)
    for target in targets(server):
        lines = cache_lines(tmp_path, target)
        assert len(lines) == len({line["key"] for line in lines}) == 30
        assert report["this_run"][target.role]["requests"] == 30


def test_retry_after_is_honoured(tmp_path):
    items = make_items(4)
    settings = EvalConfig(concurrency=4, request_timeout=5, max_retries=2)
    # Every first request gets 429 with Retry-After 1.5 s; the client's own backoff would wait <= 0.5 s.
    with FaultServer(faults=Faults(rate_limit=1.0, retry_after_s=1.5)) as server:
        started = time.monotonic()
        answers = ask_all(targets(server)[0], [item["prompt"] for item in items], {"max_tokens": 4}, settings, tmp_path)
        elapsed = time.monotonic() - started
    assert [a.text for a in answers] == [item["reference"] for item in items]
    # Waited for Retry-After (the lower bound); the upper bound only catches a runaway wait, with
    # room for a loaded machine.
    assert 1.5 <= elapsed < 20, elapsed


def test_concurrency_is_bounded(tmp_path):
    items = make_items(12)
    with FaultServer(delay_s=0.2) as server:
        ask_all(targets(server)[0], [i["prompt"] for i in items], {"max_tokens": 4}, EvalConfig(concurrency=3), tmp_path)
        assert server.max_in_flight == 3


def test_exhausted_retries_fail_clearly_and_keep_what_arrived(tmp_path):
    items = make_items(12)
    settings = EvalConfig(concurrency=4, request_timeout=5, max_retries=1)
    faults = Faults(server_error=0.5, failing_attempts=5)
    with FaultServer(faults=faults) as server:
        tuned = targets(server)[0]
        with pytest.raises(EvalRequestError) as caught:
            evaluate(items, [tuned], settings, tmp_path)
        failing = sum(1 for item in items if fault_of(faults, "tuned-model", item))
        assert 0 < failing < len(items)
        message = str(caught.value)
        assert f"{failing} of 12 requests for the tuned model" in message
        assert "raise eval.max_retries" in message and "asks only for the missing ones" in message
        assert len(cache_lines(tmp_path, tuned)) == 12 - failing

        server.faults = Faults()
        server.reset_counts()
        report, _ = evaluate(items, [tuned], settings, tmp_path)
        assert server.total_requests() == failing
        assert report["this_run"]["tuned"]["from_cache"] == 12 - failing
        assert report["metrics"]["tuned"]["exact_match"] == 1.0


def test_an_echoed_api_key_never_reaches_the_error(tmp_path):
    canary = "sk-canary-8c1f0e2d9b7a"
    with FaultServer(api_keys={"the-right-key"}) as server:
        with pytest.raises(EvalRequestError) as caught:
            ask_all(targets(server, key=canary)[0], [make_items(1)[0]["prompt"]], {}, EvalConfig(max_retries=0), tmp_path)
    message = str(caught.value)
    assert "AuthenticationError" in message and "API key was refused" in message
    assert canary not in message and caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_torn_last_cache_line_is_cut_off(tmp_path):
    target = ModelTarget("tuned", "m", "fp")
    path = cache_path(tmp_path, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = json.dumps({"key": "k1", "answer": {"text": "positive", "prompt_tokens": 3, "completion_tokens": 1, "latency_s": 0.1}})
    path.write_text(whole + "\n" + whole[:25])
    cache = ResponseCache(path)
    assert set(cache.entries) == {"k1"}
    cache.put("k2", cache.get("k1"))
    cache.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2"]


DRIVER = """
import json, sys
from pathlib import Path
from tasks.config import EvalConfig
from tasks.eval import evaluate, sampling, write_outputs
from tasks.eval_client import ModelTarget
items_file, settings_json, cache_dir, out_dir, base_url = sys.argv[1:]
targets = [ModelTarget("tuned", "tuned-model", "tuned-fp", base_url, "k"), ModelTarget("base", "base-model", "base-fp", base_url, "k")]
items, settings = json.loads(Path(items_file).read_text()), EvalConfig.model_validate_json(settings_json)
report, records = evaluate(items, targets, settings, Path(cache_dir))
write_outputs(Path(out_dir), report, records)
"""


def test_kill_9_half_way_then_rerun_requests_only_the_missing(tmp_path):
    items = make_items(40)
    items_file = tmp_path / "items.json"
    items_file.write_text(json.dumps(items))
    settings = EvalConfig(labels=LABELS, concurrency=2, prices={"tuned-model": {"input_per_million": 3.0, "output_per_million": 7.0}})
    with FaultServer(delay_s=0.05) as server:
        tuned, base = targets(server)
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(items_file), settings.model_dump_json(), str(tmp_path / "cache"), str(tmp_path / "killed"),
             server.base_url],
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while len(cache_lines(tmp_path / "cache", tuned)) < 15:
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before it could be killed"
            time.sleep(0.01)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert not (tmp_path / "killed").exists()
        cached_at_kill = {line["key"] for line in cache_lines(tmp_path / "cache", tuned)}
        assert 15 <= len(cached_at_kill) < 40 and not cache_lines(tmp_path / "cache", base)

        server.reset_counts()
        resumed, resumed_records = evaluate(items, [tuned, base], settings, tmp_path / "cache")
        for item in items:
            was_cached = ResponseCache.key(tuned, item["prompt"], sampling(settings)) in cached_at_kill
            assert server.requests_for("tuned-model", item["prompt"]) == (0 if was_cached else 1)
            assert server.requests_for("base-model", item["prompt"]) == 1
        assert resumed["this_run"]["tuned"]["requests"] == 40 - len(cached_at_kill)

        server.reset_counts()
        uninterrupted, uninterrupted_records = evaluate(items, [tuned, base], settings, tmp_path / "fresh-cache")
        assert server.total_requests() == 80
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert resumed_records == uninterrupted_records
    assert resumed["cost_usd"]["tuned"] == pytest.approx(uninterrupted["this_run"]["tuned"]["cost_usd"])
    assert resumed["cost_usd"]["tuned"] > resumed["this_run"]["tuned"]["cost_usd"] > 0  # the resumed run paid only for the rest


def judge_responder(model: str, messages: list[dict]) -> str:
    """A fair judge: prefers the answer equal to the reference; an unfair one always says A."""
    if not model.startswith("judge"):
        return last_word_responder(model, messages)
    if model == "judge-biased":
        return "A"
    text = messages[-1]["content"]
    reference, answer_a, answer_b = re.search(
        r"Reference answer:\n(.*)\n\nAnswer A:\n(.*)\n\nAnswer B:\n(.*)\n\nWhich", text, re.DOTALL
    ).groups()
    return "A" if answer_a == reference else "B" if answer_b == reference else "tie"


@pytest.mark.parametrize(("judge_model", "win_rate"), [("judge-fair", 1.0), ("judge-biased", 0.5)])
def test_judge_compares_both_orders(judge_model, win_rate, tmp_path):
    items = make_items(10)
    settings = EvalConfig(
        labels=LABELS, judge={"base_url": "http://unused/v1", "model": judge_model},
        prices={judge_model: {"input_per_million": 1.0, "output_per_million": 1.0}},
    )
    with FaultServer(responder=judge_responder) as server:
        judge = ModelTarget("judge", judge_model, judge_model, server.base_url, "k")
        report, records = evaluate(items, targets(server), settings, tmp_path, judge)
        assert server.total_requests() == 20 + 20  # tuned and base, then both orders for each item
    summary = report["judge"]
    assert summary["win_rate"] == win_rate and summary["comparisons"] == 10
    assert (summary["wins"], summary["inconsistent"]) == ((10, 0) if judge_model == "judge-fair" else (0, 10))
    assert records[0]["judge"]["tuned_first"] == "A" and records[0]["judge"]["base_first"] == ("B" if judge_model == "judge-fair" else "A")
    tokens = summary["prompt_tokens"] + summary["completion_tokens"]
    assert report["cost_usd"]["judge"] == pytest.approx(tokens / 1e6) and report["cost_usd"]["total"] == report["cost_usd"]["judge"]


def test_identical_answers_are_a_tie_without_asking_the_judge(tmp_path):
    items = make_items(3)
    settings = EvalConfig(judge={"base_url": "http://unused/v1", "model": "judge-fair"})
    with FaultServer(responder=judge_responder) as server:
        same = [ModelTarget("tuned", "tuned-model", "t", server.base_url), ModelTarget("base", "tuned-model", "b", server.base_url)]
        report, _ = evaluate(items, same, settings, tmp_path, ModelTarget("judge", "judge-fair", "j", server.base_url))
        assert server.total_requests() == 6  # one per item and model; none for the judge
    assert report["judge"]["identical_answers"] == 3 and report["judge"]["win_rate"] == 0.5
