"""Eval benchmark: request throughput at concurrency 1 vs 8, and the cost of a fully cached re-run.

Run from the repository root: `.venv/bin/python -m benchmarks.eval` (about a minute on 2 cores).

1. The local endpoint: `transformers serve` with the tiny quickstart model (built if missing),
   asked quickstart prompts (max_tokens 4) through `tasks.eval_client`, concurrency 1 then 8.
2. The same client against tests/eval_fault_server.py with a fixed 50 ms per answer, standing in
   for a remote API where the time is spent waiting, not computing.
3. A fully cached re-run of `tasks.eval.evaluate` on 1,000 items for two models (cached by a first
   pass), pointed at a counting server: it must make no request, target under 2 s.

The last line printed is one JSON object with every figure, for CI to record.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tasks.config import EvalConfig
from tasks.eval import evaluate
from tasks.eval_client import ModelTarget, ask_all
from tasks.serving import transformers_serve
from tasks.tiny_model import build_tiny_model
from tests.eval_fault_server import FaultServer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
TINY_MODEL = REPO / ".loraflow" / "models" / "tiny-llama"
LOCAL_PROMPTS = 48
STUB_PROMPTS = 80
CACHED_ITEMS = 1000
PARAMETERS = {"max_tokens": 4, "temperature": 0.0}


def quickstart_items(count: int) -> list[dict]:
    items = []
    for line in QUICKSTART_DATA.read_text().splitlines():
        messages = json.loads(line)["messages"]
        items.append({"prompt": messages[:-1], "reference": messages[-1]["content"]})
        if len(items) == count:
            return items
    raise SystemExit(f"{QUICKSTART_DATA} has fewer than {count} rows")


def requests_per_second(target: ModelTarget, prompts: list, concurrency: int, cache_dir: Path) -> float:
    started = time.perf_counter()
    answers = ask_all(target, prompts, PARAMETERS, EvalConfig(concurrency=concurrency, request_timeout=120), cache_dir)
    elapsed = time.perf_counter() - started
    assert not any(answer.cached for answer in answers), "a throughput run must not be served from the cache"
    return round(len(prompts) / elapsed, 2)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loraflow-eval-bench-") as scratch:
        run(Path(scratch))


def run(scratch: Path) -> None:
    model_dir = build_tiny_model(TINY_MODEL, seed=0, corpus_files=[QUICKSTART_DATA])
    figures: dict[str, float | int] = {}

    prompts = [item["prompt"] for item in quickstart_items(LOCAL_PROMPTS)]
    with transformers_serve(scratch / "server.log", startup_timeout=180) as base_url:
        target = ModelTarget("base", str(model_dir.resolve()), "bench", base_url)
        ask_all(target, prompts[:2], PARAMETERS, EvalConfig(), scratch / "warm-up")  # loads the model
        for concurrency in (1, 8):
            rate = requests_per_second(target, prompts, concurrency, scratch / f"local-{concurrency}")
            figures[f"local_rps_c{concurrency}"] = rate
            print(f"transformers serve, tiny model, concurrency {concurrency}: {rate} requests/s", flush=True)

    prompts = [item["prompt"] for item in quickstart_items(STUB_PROMPTS)]
    with FaultServer(delay_s=0.05) as server:
        target = ModelTarget("tuned", "tuned", "bench", server.base_url)
        for concurrency in (1, 8):
            rate = requests_per_second(target, prompts, concurrency, scratch / f"stub-{concurrency}")
            figures[f"stub_50ms_rps_c{concurrency}"] = rate
            print(f"stub server, 50 ms per answer, concurrency {concurrency}: {rate} requests/s", flush=True)

    items = quickstart_items(CACHED_ITEMS)
    settings = EvalConfig(labels=["positive", "negative", "neutral"], concurrency=16, max_tokens=4)
    with FaultServer() as server:
        targets = [ModelTarget("tuned", "tuned", "t", server.base_url), ModelTarget("base", "base", "b", server.base_url)]
        evaluate(items, targets, settings, scratch / "cache")  # fills the cache
        server.reset_counts()
        started = time.perf_counter()
        report, _ = evaluate(items, targets, settings, scratch / "cache")
        figures["cached_rerun_s"] = round(time.perf_counter() - started, 3)
        figures["cached_rerun_requests"] = server.total_requests()
    figures["cached_rerun_items"] = CACHED_ITEMS * len(targets)
    assert report["this_run"]["tuned"]["from_cache"] == CACHED_ITEMS
    print(f"fully cached re-run of {CACHED_ITEMS} items x 2 models: {figures['cached_rerun_s']} s, "
          f"{figures['cached_rerun_requests']} requests", flush=True)

    figures["local_speedup_c8"] = round(figures["local_rps_c8"] / figures["local_rps_c1"], 2)
    figures["stub_speedup_c8"] = round(figures["stub_50ms_rps_c8"] / figures["stub_50ms_rps_c1"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
