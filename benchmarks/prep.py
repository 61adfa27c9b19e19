"""Prep benchmark: rows/s of the whole prep stage against a plain `datasets` map, and its peak memory.

Run from the repository root: `.venv/bin/python -m benchmarks.prep` (200k rows, about 8 minutes on
2 cores; `--rows 20000` for a quick check). Generates seeded chat rows with lognormal lengths into
a temporary JSONL, builds the tiny tokenizer, then runs, each in its own child process:

- the baseline: `datasets.load_dataset("json")` + a batched `map` applying the chat template and
  tokenizing (num_proc=1), with the same tokenizer;
- the prep stage (`run_stage(PREP, ...)`) on the same rows: conversion, masked labels, a data contract of five
  expectations on derived columns, split, packing into 2048-token rows, shards and manifest;
- the prep stage again on a quarter of the rows, so that the two peak RSS figures show whether memory
  grows with the data.

Peak RSS is `ru_maxrss` at the end of a child that ran only that job. `--profile` also writes a
cProfile of prep and prints its top functions. The last line printed is one JSON object with every
figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl"
SEED = 0
SEQUENCE_LEN = 2048
SYSTEM_PROMPTS = (
    "You are a careful financial analyst. Answer precisely and cite the figures you use.",
    "Summarise the text for a busy reader.",
    "Answer the question about the company in plain English.",
)
CONTRACT = {
    "name": "benchmark_chat",
    "description": "Five expectations on the columns prep derives for every row.",
    "expectations": [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "last_role", "value_set": ["assistant"]}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "num_messages", "min_value": 2, "max_value": 3}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "num_tokens", "max_value": SEQUENCE_LEN}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "assistant_text"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "num_chars", "min_value": 20}, "severity": "warn"},
    ],
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- data


def word_counts(rng: np.random.Generator, count: int, median: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), 0.8, count)), low, high).astype(np.int64)


def vocabulary(model_dir: Path) -> np.ndarray:
    """Words of the quickstart data and the tiny model's corpus that the tiny tokenizer encodes in at
    most two tokens, so rows are about 1.5 tokens per word (a 2048-token vocabulary splits rarer
    words into many pieces, which would make every row several times longer than its word count)."""
    from transformers import AutoTokenizer

    from tasks.tiny_model import BUILTIN_CORPUS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = set(BUILTIN_CORPUS.split())
    with QUICKSTART_DATA.open(encoding="utf-8") as handle:
        for line in handle:
            words.update(word for message in json.loads(line)["messages"] for word in message["content"].split())
    return np.array([word for word in sorted(words) if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) <= 2])


def write_rows(path: Path, rows: int, words: np.ndarray, seed: int = SEED) -> dict[str, Any]:
    """System + user (20-400 words, median 120) + assistant (5-200 words, median 45)."""
    rng = np.random.default_rng(seed)
    user_words = word_counts(rng, rows, median=120, low=20, high=400)
    answer_words = word_counts(rng, rows, median=45, low=5, high=200)
    systems = rng.integers(0, len(SYSTEM_PROMPTS), rows)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            drawn = words[rng.integers(0, len(words), user_words[index] + answer_words[index])]
            messages = [
                {"role": "system", "content": SYSTEM_PROMPTS[systems[index]]},
                {"role": "user", "content": " ".join(drawn[: user_words[index]])},
                {"role": "assistant", "content": " ".join(drawn[user_words[index] :])},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return {"user_words_median": int(np.median(user_words)), "assistant_words_median": int(np.median(answer_words))}


# ---------------------------------------------------------------- child jobs


def run_baseline(data: Path, model_dir: Path, work_dir: Path) -> dict[str, Any]:
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in batch["messages"]]
        return tokenizer(texts, add_special_tokens=False)

    started = time.perf_counter()
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work_dir / "hf-cache"))
    tokenized = dataset.map(tokenize, batched=True, num_proc=1, remove_columns=dataset.column_names)
    seconds = time.perf_counter() - started
    return {"rows": len(tokenized), "seconds": seconds, "tokens": sum(len(ids) for ids in tokenized["input_ids"])}


def run_prep_job(data: Path, model_dir: Path, work_dir: Path, profile_path: Path | None) -> dict[str, Any]:
    import yaml

    from tasks.config import RunConfig
    from tasks.stage import run_stage, stage_key
    from tasks.stages import PREP

    contract_dir = work_dir / "contracts"
    contract_dir.mkdir(parents=True, exist_ok=True)
    (contract_dir / f"{CONTRACT['name']}.yaml").write_text(yaml.safe_dump(CONTRACT))
    cfg = RunConfig.model_validate({
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template", "contract": CONTRACT["name"]}],
        "contract": {"dir": str(contract_dir)},
        "state_dir": str(work_dir / "state"),
        "sequence_len": SEQUENCE_LEN,
        "sample_packing": True,
        "val_set_size": 0.02,
    })
    stage_key(PREP, cfg, {})  # file hashes outside the timing, as before
    # Imported outside the timing, as the baseline's imports are: the prep build imports these lazily.
    from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    rss_before = peak_rss_mb()
    profiler = cProfile.Profile() if profile_path else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    manifest = run_stage(PREP, cfg)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_path)
    seconds = time.perf_counter() - started
    return {
        "rows": manifest["rows_in"],
        "seconds": seconds,
        "rows_accepted": manifest["rows_accepted"],
        "tokens": manifest["tokens"],
        "packing_efficiency": manifest["packing_efficiency"],
        "contract_passed": manifest["sources"][0]["contract"]["passed"],
        "peak_rss_before_prep_mb": round(rss_before, 1),
    }


def child_main(args: argparse.Namespace) -> None:
    work_dir = Path(args.work_dir)
    if args.child == "baseline":
        result = run_baseline(Path(args.data), Path(args.model), work_dir)
    else:
        result = run_prep_job(Path(args.data), Path(args.model), work_dir, Path(args.profile_path) if args.profile_path else None)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


def in_child(job: str, data: Path, model_dir: Path, work_dir: Path, profile: Path | None = None) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.prep", "--child", job, "--data", str(data), "--model", str(model_dir),
               "--work-dir", str(work_dir)]
    if profile:
        command += ["--profile-path", str(profile)]
    environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{job} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def top_functions(profile: Path, count: int = 25) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(str(profile), stream=stream)
    stats.sort_stats("cumulative").print_stats(count)
    stats.sort_stats("tottime").print_stats(count)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the full-size run (RSS is also measured at a quarter)")
    parser.add_argument("--profile", action="store_true", help="cProfile the full-size prep and print the top functions")
    parser.add_argument("--child", choices=("baseline", "prep"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--profile-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    from tasks.tiny_model import build_tiny_model

    small_rows = max(args.rows // 4, 1)
    with tempfile.TemporaryDirectory(prefix="loraflow-prep-bench-") as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        model_dir = build_tiny_model(root / "model", seed=0, corpus_files=[QUICKSTART_DATA])
        data, small_data = root / "rows.jsonl", root / "rows-small.jsonl"
        words = vocabulary(model_dir)
        shape = write_rows(data, args.rows, words)
        write_rows(small_data, small_rows, words)
        print(f"setup (tiny model, {args.rows:,} + {small_rows:,} rows): {time.perf_counter() - started:.1f} s", flush=True)

        baseline = in_child("baseline", data, model_dir, root / "baseline")
        print(f"baseline load_dataset + map: {baseline['rows']:,} rows in {baseline['seconds']:.1f} s", flush=True)
        profile = root / "prep.prof" if args.profile else None
        prep = in_child("prep", data, model_dir, root / "prep", profile)
        print(f"prep: {prep['rows']:,} rows in {prep['seconds']:.1f} s, peak RSS {prep['peak_rss_mb']:.0f} MB", flush=True)
        small = in_child("prep", small_data, model_dir, root / "prep-small")
        print(f"prep: {small['rows']:,} rows in {small['seconds']:.1f} s, peak RSS {small['peak_rss_mb']:.0f} MB", flush=True)
        if profile:
            print(top_functions(profile))

    prep_rate = prep["rows"] / prep["seconds"]
    baseline_rate = baseline["rows"] / baseline["seconds"]
    figures = {
        "benchmark": "prep",
        "rows": args.rows,
        **shape,
        "sequence_len": SEQUENCE_LEN,
        "tokens": prep["tokens"],
        "prep_rows_per_s": round(prep_rate, 1),
        "baseline_rows_per_s": round(baseline_rate, 1),
        "ratio_prep_over_baseline": round(prep_rate / baseline_rate, 3),
        "target_ratio": 1.0,
        "prep_seconds": round(prep["seconds"], 1),
        "baseline_seconds": round(baseline["seconds"], 1),
        "packing_efficiency": prep["packing_efficiency"],
        "contract_passed": prep["contract_passed"],
        "peak_rss_mb": {str(small["rows"]): small["peak_rss_mb"], str(prep["rows"]): prep["peak_rss_mb"]},
        "peak_rss_before_prep_mb": {
            str(small["rows"]): small["peak_rss_before_prep_mb"], str(prep["rows"]): prep["peak_rss_before_prep_mb"],
        },
        "baseline_peak_rss_mb": baseline["peak_rss_mb"],
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
