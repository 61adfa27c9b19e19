"""eval: score the tuned model (and the base model) through an OpenAI-compatible API, the way it
will be served.

Answers come from the endpoint through the `openai` client and a response cache keyed by the
model's content fingerprint, so re-running eval after an eval-only config change never asks the
same question twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks import store
from tasks.config import EvalConfig, RunConfig, stage_settings
from tasks.eval_client import Answer, ask_all
from tasks.fingerprint import FileHasher, code_version, hash_json
from tasks.merge import load_adapter_model, save_merged
from tasks.serving import local_server

log = logging.getLogger("loraflow.eval")

REPORT = "eval_report.json"
SAMPLES = "samples.jsonl"
LOCAL_API_KEY = "loraflow-local"  # transformers serve ignores the key; the client requires one


def fingerprint(cfg: RunConfig, prep_fingerprint: str, train_fingerprint: str, hasher: FileHasher) -> str:
    return hash_json({
        "settings": stage_settings(cfg, "eval"),
        "prep": prep_fingerprint,
        "train": train_fingerprint,
        "base_model": hasher.tree(Path(cfg.base_model)),
        "code": code_version("eval", "eval_client", "serving", "merge"),
    })


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


def score(prediction: str, reference: str, labels: list[str] | None) -> dict[str, float]:
    """Exact match after normalisation; with a closed label set, accuracy counts a reply that names
    exactly one label, the right one (so "positive, not negative" is wrong)."""
    scores = {"exact_match": float(normalise(prediction) == normalise(reference))}
    if labels:
        named = {label for label in labels if re.search(rf"\b{re.escape(normalise(label))}\b", normalise(prediction))}
        scores["accuracy"] = float(named == {normalise(reference)})
    return scores


def summarise(answers: list[Answer], scores: list[dict[str, float]]) -> dict[str, Any]:
    latencies = sorted(answer.latency_s for answer in answers if not answer.cached)
    summary = {name: statistics.fmean(s[name] for s in scores) for name in scores[0]}
    summary.update({
        "samples": len(answers),
        "requests_made": len(latencies),
        "prompt_tokens": sum(answer.prompt_tokens for answer in answers),
        "completion_tokens": sum(answer.completion_tokens for answer in answers),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
    })
    return summary


def _percentile(sorted_values: list[float], percent: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(percent / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index], 4)


def load_eval_items(prep_dir: Path, limit: int) -> list[dict[str, Any]]:
    """Val conversations as (prompt, reference): everything before the last assistant turn is the
    prompt, the last assistant turn is the reference."""
    items = []
    with (prep_dir / "val_messages.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            items.append({"prompt": messages[:last], "reference": messages[last]["content"]})
            if len(items) == limit:
                break
    return items


def run_eval(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, train_fingerprint: str) -> dict[str, Any]:
    final_dir = store.stage_dir(cfg, "eval", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    started = time.monotonic()
    train_manifest = store.require_manifest(cfg, "train", train_fingerprint)
    store.require_manifest(cfg, "prep", prep_fingerprint)
    items = load_eval_items(store.stage_dir(cfg, "prep", prep_fingerprint), cfg.eval.max_samples)
    if not items:
        raise ValueError("eval has no val rows to score: set val_set_size above 0")
    work_dir = store.fresh_partial_dir(final_dir)
    prompts = [item["prompt"] for item in items]
    cache_root = Path(cfg.state_dir) / "response_cache"

    models: dict[str, list[Answer]] = {}
    if cfg.eval.endpoint == "external":
        models["tuned"] = _ask_external(cfg.eval, prompts, cache_root)
    else:
        adapter_dir = store.stage_dir(cfg, "train", train_fingerprint) / train_manifest["adapter_dir"]
        tuned_dir = work_dir / "tuned-model"
        _merge_for_serving(cfg, adapter_dir, tuned_dir)
        with local_server(work_dir / "server.log", cfg.eval.startup_timeout) as base_url:
            models["tuned"] = _ask_local(cfg.eval, base_url, tuned_dir, prompts, cache_root / f"tuned-{train_fingerprint[:16]}.jsonl")
            if cfg.eval.compare_base:
                base_hash = FileHasher().tree(Path(cfg.base_model))
                models["base"] = _ask_local(cfg.eval, base_url, Path(cfg.base_model), prompts, cache_root / f"base-{base_hash[:16]}.jsonl")
        shutil.rmtree(tuned_dir)

    per_model_scores = {
        name: [score(answer.text, item["reference"], cfg.eval.labels) for answer, item in zip(answers, items)]
        for name, answers in models.items()
    }
    metrics = {name: summarise(models[name], per_model_scores[name]) for name in models}
    with (work_dir / SAMPLES).open("w", encoding="utf-8") as handle:
        for index, item in enumerate(items):
            record = {"prompt": item["prompt"], "reference": item["reference"]}
            for name in models:
                record[f"{name}_answer"] = models[name][index].text
                record[f"{name}_scores"] = per_model_scores[name][index]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    report = {
        "metrics": metrics,
        "eval_loss": train_manifest.get("eval_loss"),
        "eval_perplexity": train_manifest.get("eval_perplexity"),
    }
    store.write_json_atomic(work_dir / REPORT, report)
    manifest = {
        "stage": "eval",
        "fingerprint": fingerprint,
        "train_fingerprint": train_fingerprint,
        "report": REPORT,
        "samples_file": SAMPLES,
        **report,
        "duration_s": round(time.monotonic() - started, 2),
    }
    for name, summary in metrics.items():
        log.info("eval %s: %s", name, {k: v for k, v in summary.items() if k in ("exact_match", "accuracy", "samples", "requests_made")})
    return store.publish(work_dir, final_dir, manifest)


def _merge_for_serving(cfg: RunConfig, adapter_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    model = load_adapter_model(cfg.base_model, adapter_dir, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    save_merged(model.merge_and_unload(), tokenizer, out_dir)


def _sampling(settings: EvalConfig) -> dict[str, Any]:
    return {"max_tokens": settings.max_tokens, "temperature": settings.temperature}


def _ask_local(settings: EvalConfig, base_url: str, model_dir: Path, prompts: list, cache_path: Path) -> list[Answer]:
    return ask_all(
        base_url, str(model_dir.resolve()), LOCAL_API_KEY, prompts, _sampling(settings), cache_path,
        settings.concurrency, settings.request_timeout, settings.max_retries,
    )


def _ask_external(settings: EvalConfig, prompts: list, cache_root: Path) -> list[Answer]:
    if not settings.base_url or not settings.model:
        raise ValueError("eval.endpoint: external needs eval.base_url and eval.model")
    api_key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else "none"
    if not api_key:
        raise ValueError(f"eval.api_key_env names {settings.api_key_env}, which is not set in the environment")
    cache_path = cache_root / f"external-{hash_json([settings.base_url, settings.model])[:16]}.jsonl"
    return ask_all(
        settings.base_url, settings.model, api_key, prompts, _sampling(settings), cache_path,
        settings.concurrency, settings.request_timeout, settings.max_retries,
    )


@task(name="eval", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def eval_task(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, train_fingerprint: str) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.progress import artifact_key

    manifest = run_eval(cfg, fingerprint, prep_fingerprint, train_fingerprint)
    rows = [{"model": name, **summary} for name, summary in manifest["metrics"].items()]
    create_table_artifact(table=rows, key=artifact_key(cfg.name, "eval-metrics"), description="Eval metrics per model")
    create_markdown_artifact(markdown=comparison_markdown(manifest), key=artifact_key(cfg.name, "eval-comparison"))
    return manifest


def comparison_markdown(manifest: dict[str, Any]) -> str:
    metrics = manifest["metrics"]
    names = sorted({key for summary in metrics.values() for key in summary})
    lines = ["| metric | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(str(metrics[m].get(name)) for m in metrics) + " |" for name in names]
    return "# Eval: base vs tuned\n\n" + "\n".join(lines)
