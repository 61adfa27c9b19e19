"""Prep benchmark: loraflow's prep against `datasets.map(apply_chat_template)`, and what a re-run
after appending 1% more rows costs.

Run from the repository root: `.venv/bin/python -m benchmarks.prep` (50k rows for throughput, a
200k-row source for the append; about 6 minutes on an idle 2-core machine; `--rows 5000
--append-rows 20000` for a quick check). Seeded chat rows with long-tailed lengths (median about
300 tokens, p99 about 2,000; `sequence_len` 2048) go into JSONL files; the tiny tokenizer is built;
then each job runs in its own child process (so peak RSS is that job's):

- baselines: `load_dataset("json")` + a batched `map` applying the chat template and tokenizing,
  with `num_proc=1` and with `num_proc=2`;
- loraflow prep (`run_stage(PREP, ...)`: conversion, masked labels, split, packing, shards and
  manifest) with no contract and with a quickstart-style contract of five expectations, each on
  an empty chunk cache, with its default `dataset_processes` (every core);
- append: prep of the 200k-row source, then of the same file with 1% more rows appended (same
  state_dir: unchanged chunks are reused), then of the grown file on an empty cache; the second's
  shards must equal the third's.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
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


class AnonymousMemory:
    """The most anonymous (heap) memory this process held, sampled every 50 ms. Peak RSS also
    counts the pages of memory-mapped files prep reads (its chunk outputs), which the kernel can
    drop at any time; this is the memory that grows when a program holds its data."""

    def __init__(self) -> None:
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb, 1)


# ---------------------------------------------------------------- data


def word_counts(rng: np.random.Generator, count: int, median: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), 1.05, count)), low, high).astype(np.int64)


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


def write_rows(path: Path, rows: int, words: np.ndarray, seed: int = SEED, mode: str = "w") -> dict[str, Any]:
    """System + user (median 115 words, long tail to 2,000) + assistant (median 45 words, to 700)."""
    rng = np.random.default_rng(seed)
    user_words = word_counts(rng, rows, median=115, low=5, high=2000)
    answer_words = word_counts(rng, rows, median=45, low=3, high=700)
    systems = rng.integers(0, len(SYSTEM_PROMPTS), rows)
    with path.open(mode, encoding="utf-8") as handle:
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


def run_baseline(data: Path, model_dir: Path, work_dir: Path, processes: int) -> dict[str, Any]:
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in batch["messages"]]
        return tokenizer(texts, add_special_tokens=False)

    started = time.perf_counter()
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work_dir / "hf-cache"))
    tokenized = dataset.map(tokenize, batched=True, num_proc=processes, remove_columns=dataset.column_names)
    seconds = time.perf_counter() - started
    return {"rows": len(tokenized), "seconds": seconds}


def run_prep_job(data: Path, model_dir: Path, work_dir: Path, contract: bool, profile_path: Path | None) -> dict[str, Any]:
    import yaml

    from tasks import store
    from tasks.config import RunConfig
    from tasks.stage import run_stage, stage_key
    from tasks.stages import PREP

    contract_dir = work_dir / "contracts"
    contract_dir.mkdir(parents=True, exist_ok=True)
    (contract_dir / f"{CONTRACT['name']}.yaml").write_text(yaml.safe_dump(CONTRACT))
    cfg = RunConfig.model_validate({
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template", **({"contract": CONTRACT["name"]} if contract else {})}],
        "contract": {"dir": str(contract_dir), "max_rejected_fraction": 0.2},
        "state_dir": str(work_dir / "state"),
        "sequence_len": SEQUENCE_LEN,
        "sample_packing": True,
        "val_set_size": 0.02,
    })
    stage_key(PREP, cfg, {})  # file hashes outside the timing, as the baseline's file is not hashed either
    rss_before = peak_rss_mb()
    anonymous = AnonymousMemory()
    profiler = cProfile.Profile() if profile_path else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    manifest = run_stage(PREP, cfg)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_path)
    seconds = time.perf_counter() - started
    prep_dir = store.output_dir(cfg, manifest)
    return {
        "rows": manifest["rows_in"],
        "seconds": seconds,
        "rows_accepted": manifest["rows_accepted"],
        "tokens": manifest["tokens"],
        "packing_efficiency": manifest["packing_efficiency"],
        "chunks": manifest["chunks"],
        "contract_passed": manifest["sources"][0]["contract"]["passed"] if contract else None,
        "shards": [shard["sha256"] for shard in manifest["train_shards"] + manifest["val_shards"]],
        "quarantine_sha256": hashlib.sha256((prep_dir / "quarantine.jsonl").read_bytes()).hexdigest(),
        "peak_rss_before_prep_mb": round(rss_before, 1),
        "peak_anonymous_mb": anonymous.stop(),
    }


def child_main(args: argparse.Namespace) -> None:
    work_dir = Path(args.work_dir)
    if args.child.startswith("baseline"):
        result = run_baseline(Path(args.data), Path(args.model), work_dir, processes=int(args.child.removeprefix("baseline")))
    else:
        result = run_prep_job(Path(args.data), Path(args.model), work_dir, args.child == "prep-contract",
                              Path(args.profile_path) if args.profile_path else None)
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
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{job} on {data.name}: {result['rows']:,} rows in {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB",
          flush=True)
    return result


def token_lengths(data: Path, model_dir: Path, sample: int = 5000) -> dict[str, int]:
    """Median and p99 tokens per row of the rendered chat, over the first rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with data.open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(sample)):
            text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return {"tokens_median": int(np.median(lengths)), "tokens_p99": int(np.percentile(lengths, 99))}


def top_functions(profile: Path, count: int = 25) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(str(profile), stream=stream)
    stats.sort_stats("cumulative").print_stats(count)
    stats.sort_stats("tottime").print_stats(count)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the throughput comparison")
    parser.add_argument("--append-rows", type=int, default=200_000, help="rows of the source that grows by 1%%")
    parser.add_argument("--profile", action="store_true", help="cProfile the contract-off prep and print the top functions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--profile-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    from tasks.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="loraflow-prep-bench-") as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        model_dir = build_tiny_model(root / "model", seed=0, corpus_files=[QUICKSTART_DATA])
        words = vocabulary(model_dir)
        data, grown = root / "rows.jsonl", root / "grown.jsonl"
        shape = write_rows(data, args.rows, words)
        write_rows(grown, args.append_rows, words, seed=SEED + 1)
        shape.update(token_lengths(data, model_dir))
        print(f"setup: {time.perf_counter() - started:.1f} s; {shape}", flush=True)

        # Throughput, on the same rows.
        baseline = in_child("baseline1", data, model_dir, root / "baseline1")
        baseline2 = in_child("baseline2", data, model_dir, root / "baseline2")
        profile = root / "prep.prof" if args.profile else None
        prep = in_child("prep", data, model_dir, root / "prep", profile)
        prep_contract = in_child("prep-contract", data, model_dir, root / "prep-contract")
        if profile:
            print(top_functions(profile))

        # Cost of a nightly append: the same state_dir before and after 1% more rows.
        first = in_child("prep-contract", grown, model_dir, root / "append")
        write_rows(grown, args.append_rows // 100, words, seed=SEED + 2, mode="a")
        appended = in_child("prep-contract", grown, model_dir, root / "append")
        scratch = in_child("prep-contract", grown, model_dir, root / "scratch")

    def rate(result: dict[str, Any]) -> float:
        return result["rows"] / result["seconds"]

    figures = {
        "benchmark": "prep",
        "rows": args.rows,
        **shape,
        "sequence_len": SEQUENCE_LEN,
        "prep_rows_per_s": round(rate(prep), 1),
        "prep_contract_rows_per_s": round(rate(prep_contract), 1),
        "baseline_map_rows_per_s": round(rate(baseline), 1),
        "baseline_map_num_proc2_rows_per_s": round(rate(baseline2), 1),
        "ratio_prep_over_map": round(rate(prep) / rate(baseline), 3),
        "ratio_prep_over_map_num_proc2": round(rate(prep) / rate(baseline2), 3),
        "ratio_prep_contract_over_map": round(rate(prep_contract) / rate(baseline), 3),
        "targets": {"ratio_prep_over_map": 1.5, "ratio_prep_over_map_num_proc2": 1.0, "ratio_prep_contract_over_map": 1.0,
                    "append_over_full": 0.10},
        "append_source_rows": first["rows"],
        "append_rows_added": appended["rows"] - first["rows"],
        "full_prep_s": round(first["seconds"], 2),
        "append_prep_s": round(appended["seconds"], 2),
        "append_over_full": round(appended["seconds"] / first["seconds"], 3),
        "append_chunks": appended["chunks"],
        "append_shards_equal_scratch": appended["shards"] == scratch["shards"]
        and appended["quarantine_sha256"] == scratch["quarantine_sha256"],
        "packing_efficiency": prep["packing_efficiency"],
        "rows_accepted": prep["rows_accepted"],
        "contract_passed": prep_contract["contract_passed"],
        "peak_rss_mb": {"prep": prep["peak_rss_mb"], "prep_contract": prep_contract["peak_rss_mb"],
                        f"prep_{first['rows']}_rows": first["peak_rss_mb"], "baseline_map": baseline["peak_rss_mb"],
                        "baseline_map_num_proc2": baseline2["peak_rss_mb"]},
        # Heap only, without the pages of the memory-mapped chunk outputs: flat in the number of rows?
        "peak_anonymous_mb": {f"prep_{prep['rows']}_rows": prep["peak_anonymous_mb"],
                              f"prep_{first['rows']}_rows": first["peak_anonymous_mb"]},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
