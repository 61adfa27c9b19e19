"""eval: score the tuned model (and the base model) through an OpenAI-compatible API, the way it
will be served.

Endpoints (`eval.endpoint`): `local` merges the adapter and starts `transformers serve` (CPU
works); `vllm` starts vLLM with the base model and the adapter (GPU); `external` asks any
OpenAI-compatible `base_url` for `eval.model` (and `eval.base_model_name` to compare against), with
the API key from the environment variable or Prefect Secret block the config names. A server we
start is always stopped, and is not started at all when every answer is already cached.

Answers go through `tasks.eval_client` (bounded concurrency, retries, a response cache keyed by the
model's fingerprint, the prompt and the sampling parameters), so a re-run, or a run resumed after a
kill, requests only what is missing. Scores: exact match, ROUGE-L, label accuracy
(`tasks.eval_metrics`), latency p50/p95/p99, tokens and cost per model and in total, an optional
pairwise LLM judge (`tasks.judge`), and the val split's eval loss / perplexity from training.

Outputs: `eval_report.json`, `samples.jsonl` (prompt, reference, each model's answer and scores,
the judge's verdicts), `server.log` for a server we started, and in Prefect a table and a markdown
artifact comparing base and tuned. Raises `EvalError` (nothing to score), `ApiKeyError`,
`EvalRequestError`, `EndpointUnavailableError` and `ServerError`, each saying what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import atomic, hub, store
from tasks.config import EvalConfig, RunConfig
from tasks.errors import StageFailedError
from tasks.eval_client import Answer, ModelTarget, ask_all, count_missing, resolve_api_key, spending_limit
from tasks.eval_metrics import cost_usd, score, summarise, usage_summary
from tasks.fingerprint import FileHasher, hash_json
from tasks.judge import judge_pairs, win_rate_summary
from tasks.merge import load_merged, save_merged
from tasks.quantization import compute_dtype_name
from tasks.serving import VLLM_BASE_NAME, VLLM_TUNED_NAME, transformers_serve, vllm_serve

log = logging.getLogger("loraflow.eval")

REPORT = "eval_report.json"
SAMPLES = "samples.jsonl"
TEST_SAMPLES = "test_samples.jsonl"
SERVER_LOG = "server.log"
RESPONSE_CACHE = "response_cache"
class EvalError(StageFailedError):
    """Eval cannot run on these inputs; the message names the setting to change."""


def load_eval_items(
    prep_dir: Path, limit: int | None, file_name: str = "val_messages.jsonl", with_text: bool = False
) -> list[dict[str, Any]]:
    """Val (or test set) conversations as (prompt, reference): everything before the last assistant
    turn is the prompt, the last assistant turn is the reference. Rows of plain text (`completion`,
    `input_output`) have no answer turn to score; `with_text` returns them as {"text": prompt
    part} too, for checks that only need model input (the export's merge verification)."""
    items = []
    with (prep_dir / file_name).open(encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            if messages and "role" not in messages[0]:  # text segments {"text", "train"}
                if with_text:
                    untrained = "".join(segment["text"] for segment in messages if not segment["train"])
                    items.append({"text": untrained or messages[0]["text"][: max(1, len(messages[0]["text"]) // 2)]})
            else:
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                items.append({"prompt": messages[:last], "reference": messages[last]["content"]})
            if len(items) == limit:
                break
    return items


def build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    """The eval stage: answers for the val items (and the pinned test set's) from each model,
    scored; the manifest fields."""
    train_manifest, prep_manifest = upstream["train"], upstream["prep"]
    prep_dir = store.output_dir(cfg, prep_manifest)
    items = load_eval_items(prep_dir, cfg.eval.max_samples)
    # The pinned test set is scored in full, every run: it is what the promotion gate compares on.
    test_items = load_eval_items(prep_dir, None, prep_manifest["test_items"]) if prep_manifest.get("test_items") else []
    if not items:  # `val_set_size: 0`: the pinned test set is what there is to score
        items = test_items
    if not items:
        # `val_set_size: 0` and no `eval.test_set`: nothing to score, said once here and by the gate.
        reason = (
            "eval skipped: no val split (val_set_size: 0) and no eval.test_set, so there is nothing to score"
            if cfg.val_set_size == 0 else
            "eval skipped: the val rows are plain text (completion / input_output) with no answer turn to score"
        )
        log.warning(reason)
        return {"skipped": reason, "metrics": {}, "samples": 0, "cost_usd": {"total": 0.0},
                "eval_loss": train_manifest.get("eval_loss"), "eval_perplexity": train_manifest.get("eval_perplexity")}
    cache_dir = Path(cfg.state_dir) / RESPONSE_CACHE
    adapter_dir = store.output_dir(cfg, train_manifest) / train_manifest["adapter_dir"]
    judge = judge_target(cfg.eval)

    prompts = [item["prompt"] for item in items + test_items]
    # Answers are cached by what the tuned model is (its train output digest), not by the run that made it.
    with spending_limit(cfg.eval.budget_usd, cfg.eval.prices), \
            model_endpoints(cfg, adapter_dir, train_manifest["output_digest"], prompts, work_dir, cache_dir) as targets:
        report, records = evaluate(items, targets, cfg.eval, cache_dir, judge)
        test_report, test_records = evaluate(test_items, targets, cfg.eval, cache_dir) if test_items else (None, [])
    report["items_sha256"] = items_digest(items)
    if test_report is not None:
        report["test_set"] = {
            "path": cfg.eval.test_set.path if cfg.eval.test_set else None,
            "file_sha256": prep_manifest["test_items_sha256"],
            "items_sha256": items_digest(test_items),
            "samples": test_report["samples"],
            "metrics": test_report["metrics"],
            "cost_usd": test_report["cost_usd"],
            "samples_file": TEST_SAMPLES,
        }
        atomic.write_jsonl(work_dir / TEST_SAMPLES, test_records)
    report["eval_loss"] = train_manifest.get("eval_loss")
    report["eval_perplexity"] = train_manifest.get("eval_perplexity")
    write_outputs(work_dir, report, records)
    manifest = {"report": REPORT, "samples_file": SAMPLES, **report}
    for role, summary in report["metrics"].items():
        log.info("eval %s: %s", role, {k: v for k, v in summary.items() if k in ("exact_match", "accuracy", "rouge_l", "samples")})
    for role, summary in (report.get("test_set") or {}).get("metrics", {}).items():
        shown = {k: v for k, v in summary.items() if k in ("exact_match", "accuracy", "rouge_l", "samples")}
        log.info("eval %s on the test set: %s", role, shown)
    if report["judge"] is not None:
        log.info("eval judge: tuned win rate %s over %d comparisons", report["judge"]["win_rate"], report["judge"]["comparisons"])
    return manifest


def items_digest(items: list[dict[str, Any]]) -> str:
    """What a set of scored items is, for comparing two models on the same ones (the gate)."""
    return hash_json([{"prompt": item["prompt"], "reference": item["reference"]} for item in items])


def sampling(settings: EvalConfig) -> dict[str, Any]:
    return {"max_tokens": settings.max_tokens, "temperature": settings.temperature}


def judge_target(settings: EvalConfig) -> ModelTarget | None:
    judge = settings.judge
    if judge is None:
        return None
    if settings.endpoint == "external" and not settings.base_model_name:
        raise EvalError("`eval.judge` compares the tuned model with the base model: set `eval.base_model_name` for the external endpoint")
    api_key = resolve_api_key(judge.api_key_env, judge.api_key_secret, "eval.judge")
    return ModelTarget("judge", judge.model, hash_json({"endpoint": judge.base_url, "model": judge.model}), judge.base_url, api_key)


@contextlib.contextmanager
def model_endpoints(
    cfg: RunConfig, adapter_dir: Path, train_fingerprint: str, prompts: list, work_dir: Path, cache_dir: Path
) -> Iterator[list[ModelTarget]]:
    """The tuned (and base) model as `ModelTarget`s, behind a server started here when needed."""
    settings = cfg.eval
    if settings.endpoint == "external":
        if not settings.base_url or not settings.model:
            raise EvalError("`eval.endpoint: external` needs `eval.base_url` and `eval.model`")
        api_key = resolve_api_key(settings.api_key_env, settings.api_key_secret, "eval")
        # The tuned model behind the endpoint is taken to be this run's: retraining invalidates its answers.
        external = [("tuned", settings.model, train_fingerprint)]
        if settings.compare_base and settings.base_model_name:
            external.append(("base", settings.base_model_name, None))
        yield [
            ModelTarget(role, name, hash_json({"endpoint": settings.base_url, "model": name, "train": trained}), settings.base_url, api_key)
            for role, name, trained in external
        ]
        return

    # Our own weights: the cache follows their content, whichever directory serves them.
    tuned_dir = work_dir / "tuned-model"
    base = hub.base_model(cfg)
    base_hash = hash_json(base.identity(FileHasher(Path(cfg.state_dir) / "file-hashes.json")))
    if settings.endpoint == "local":
        names = {"tuned": str(tuned_dir.resolve()), "base": str(base.path.resolve())}
    else:
        names = {"tuned": VLLM_TUNED_NAME, "base": VLLM_BASE_NAME}
    model_fingerprints = {"tuned": train_fingerprint, "base": base_hash}
    roles = ["tuned", "base"] if settings.compare_base else ["tuned"]
    offline = [ModelTarget(role, names[role], f"{settings.endpoint}:{model_fingerprints[role]}") for role in roles]
    if all(count_missing(target, prompts, sampling(settings), cache_dir) == 0 for target in offline):
        log.info("eval: every answer is cached; no model server started")
        yield offline
        return

    if settings.endpoint == "local":
        _merge_for_serving(cfg, adapter_dir, tuned_dir)
        server = transformers_serve(work_dir / SERVER_LOG, settings.startup_timeout)
    else:
        server = vllm_serve(str(base.path), adapter_dir, cfg.lora_r, work_dir / SERVER_LOG, settings.startup_timeout)
    try:
        with server as base_url:
            yield [dataclasses.replace(target, base_url=base_url) for target in offline]
    finally:
        shutil.rmtree(tuned_dir, ignore_errors=True)


def _merge_for_serving(cfg: RunConfig, adapter_dir: Path, out_dir: Path) -> None:
    """`transformers serve` cannot load a PEFT adapter directory: it serves the merged model (for
    QLoRA merged into the de-quantized nf4 base it was trained on, see `tasks.merge`)."""
    from transformers import AutoTokenizer

    qlora_dtype = compute_dtype_name(cfg) if cfg.load_in_4bit else None
    model, _ = load_merged(hub.base_model_dir(cfg), adapter_dir, "float32", cfg.trust_remote_code, qlora_dtype=qlora_dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    save_merged(model, tokenizer, out_dir)


def evaluate(
    items: list[dict[str, Any]], targets: list[ModelTarget], settings: EvalConfig, cache_dir: Path, judge: ModelTarget | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Asks every target for every item (cached answers are not asked again), scores them, and
    returns the report and one record per item. Needs no upstream stage: items are
    `{"prompt": messages, "reference": text}`."""
    prompts = [item["prompt"] for item in items]
    answers = {target.role: ask_all(target, prompts, sampling(settings), settings, cache_dir) for target in targets}
    scores = {
        role: [score(answer.text, item["reference"], settings) for answer, item in zip(role_answers, items)]
        for role, role_answers in answers.items()
    }
    costs = {target.role: _cost(settings, target, answers[target.role]) for target in targets}
    metrics = {
        target.role: summarise(scores[target.role], *_usage(answers[target.role]), costs[target.role]) for target in targets
    }
    this_run = {target.role: _this_run(settings, target, answers[target.role]) for target in targets}

    judge_report, verdicts = None, None
    if judge is not None and settings.judge is not None and "base" in answers:
        verdicts, replies = judge_pairs(items, answers["tuned"], answers["base"], settings.judge, judge, settings, cache_dir)
        costs["judge"] = _cost(settings, judge, replies)
        judge_report = {"model": judge.model, **win_rate_summary(verdicts), **usage_summary(*_usage(replies), costs["judge"])}
        this_run["judge"] = _this_run(settings, judge, replies)

    records = []
    for index, item in enumerate(items):
        record: dict[str, Any] = {"index": index, "prompt": item["prompt"], "reference": item["reference"]}
        for role in answers:
            record[f"{role}_answer"] = answers[role][index].text
            record[f"{role}_scores"] = scores[role][index]
        if verdicts is not None:
            record["judge"] = verdicts[index]
        records.append(record)
    report = {
        "samples": len(items),
        "metrics": metrics,
        "judge": judge_report,
        "cost_usd": {**{role: round(cost, 6) for role, cost in costs.items()}, "total": round(sum(costs.values()), 6)},
        "this_run": this_run,
    }
    return report, records


def _usage(answers: list[Answer]) -> tuple[list[float], int, int]:
    return (
        [answer.latency_s for answer in answers],
        sum(answer.prompt_tokens for answer in answers),
        sum(answer.completion_tokens for answer in answers),
    )


def _cost(settings: EvalConfig, target: ModelTarget, answers: list[Answer]) -> float:
    _, prompt_tokens, completion_tokens = _usage(answers)
    return cost_usd(settings.prices, target.price_names(), prompt_tokens, completion_tokens)


def _this_run(settings: EvalConfig, target: ModelTarget, answers: list[Answer]) -> dict[str, Any]:
    """What this run itself asked for and paid (the rest of the report covers every answer)."""
    fresh = [answer for answer in answers if not answer.cached]
    return {
        "requests": len(fresh),
        "from_cache": len(answers) - len(fresh),
        "retries": sum(answer.retries for answer in fresh),
        "cost_usd": round(_cost(settings, target, fresh), 6),
    }


def write_outputs(out_dir: Path, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """`samples.jsonl` and `eval_report.json`, each written to a temporary file and renamed."""
    atomic.write_jsonl(out_dir / SAMPLES, records)
    atomic.write_json(out_dir / REPORT, report)


def report(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """Prefect artifacts of an eval run: the metrics table and the base-vs-tuned comparison."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.stage import artifact_key

    if manifest.get("skipped"):
        create_markdown_artifact(markdown=f"# Eval\n\n{manifest['skipped']}.", key=artifact_key(cfg.name, "eval-comparison"))
        return
    create_table_artifact(table=metric_rows(manifest), key=artifact_key(cfg.name, "eval-metrics"), description="Eval metrics per model")
    create_markdown_artifact(markdown=comparison_markdown(manifest), key=artifact_key(cfg.name, "eval-comparison"))


def metric_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": role, **summary} for role, summary in manifest["metrics"].items()]


def comparison_markdown(manifest: dict[str, Any]) -> str:
    metrics = manifest["metrics"]
    roles = list(metrics)
    names = [name for name in next(iter(metrics.values())) if all(name in metrics[role] for role in roles)]
    compare = "base" in metrics and "tuned" in metrics
    header = "| metric | " + " | ".join(roles) + (" | tuned - base |" if compare else " |")
    lines = [header, "|---|" + "---|" * (len(roles) + compare)]
    for name in names:
        values = [metrics[role][name] for role in roles]
        row = f"| {name} | " + " | ".join(_cell(value) for value in values) + " |"
        if compare:
            tuned, base = metrics["tuned"][name], metrics["base"][name]
            both_numbers = isinstance(tuned, (int, float)) and isinstance(base, (int, float))
            row += f" {_cell(tuned - base) if both_numbers else ''} |"
        lines.append(row)
    parts = ["# Eval: base vs tuned", "\n".join(lines)]
    if manifest.get("judge"):
        judge = manifest["judge"]
        parts.append(
            f"**LLM judge** ({judge['model']}, both orders): tuned win rate **{judge['win_rate']}** over "
            f"{judge['comparisons']} comparisons ({judge['wins']} wins, {judge['losses']} losses, {judge['ties']} ties; "
            f"{judge['inconsistent']} inconsistent across orders)."
        )
    parts.append(f"**Cost**: {_cell(manifest['cost_usd']['total'])} USD in total.")
    if manifest.get("eval_loss") is not None:
        parts.append(f"**Val split** (tuned): eval loss {_cell(manifest['eval_loss'])}, perplexity {_cell(manifest['eval_perplexity'])}.")
    return "\n\n".join(parts)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
