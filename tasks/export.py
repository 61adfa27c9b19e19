"""export: merge the adapter into the base weights, prove the merged model equals the adapter
model, and write safetensors + tokenizer + a model card with lineage.

The check runs before anything is published: a merge that changes the outputs (or changes
nothing at all) fails the stage instead of handing users a broken model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task

from tasks import store
from tasks.config import RunConfig, stage_settings
from tasks.eval import load_eval_items
from tasks.fingerprint import FileHasher, code_version, hash_json
from tasks.merge import load_adapter_model, save_merged

log = logging.getLogger("loraflow.export")

MODEL = "model"
# Merged and adapter models compute the same function; they differ only by rounding in the dtype.
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


class MergeVerificationError(RuntimeError):
    """The merged model does not reproduce the adapter model."""


def fingerprint(cfg: RunConfig, train_fingerprint: str, eval_fingerprint: str) -> str:
    return hash_json({
        "settings": stage_settings(cfg, "export"),
        "train": train_fingerprint,
        "eval": eval_fingerprint,
        "code": code_version("export", "merge"),
    })


def run_export(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, train_fingerprint: str, eval_fingerprint: str) -> dict[str, Any]:
    final_dir = store.stage_dir(cfg, "export", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    started = time.monotonic()
    train_manifest = store.require_manifest(cfg, "train", train_fingerprint)
    eval_manifest = store.require_manifest(cfg, "eval", eval_fingerprint)
    work_dir = store.fresh_partial_dir(final_dir)

    import torch
    from transformers import AutoTokenizer

    adapter_dir = store.stage_dir(cfg, "train", train_fingerprint) / train_manifest["adapter_dir"]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = load_adapter_model(cfg.base_model, adapter_dir, cfg.export.merge_dtype, cfg.trust_remote_code)
    items = load_eval_items(store.stage_dir(cfg, "prep", prep_fingerprint), cfg.export.verify_prompts)
    batch = [tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True, return_tensors="pt")["input_ids"] for item in items]

    with torch.no_grad():
        adapter_logits = [model(ids, use_cache=False).logits for ids in batch]
        # peft wraps adapted layers: `q_proj.base_layer.weight` becomes `q_proj.weight` once merged.
        base_weights = {
            name.replace(".base_layer", ""): p.detach().clone() for name, p in model.get_base_model().named_parameters()
        }
        merged = model.merge_and_unload()
        merged_logits = [merged(ids, use_cache=False).logits for ids in batch]
    max_logit_diff = max(float((a - b).abs().max()) for a, b in zip(adapter_logits, merged_logits))
    changed = sum(
        1 for name, p in merged.named_parameters()
        if (before := base_weights.get(name)) is not None and not torch.equal(before, p)
    )
    tolerance = LOGIT_TOLERANCE[cfg.export.merge_dtype]
    if max_logit_diff > tolerance:
        raise MergeVerificationError(
            f"merged model differs from the adapter model: max logit difference {max_logit_diff:.3g} "
            f"> {tolerance} for {cfg.export.merge_dtype}; try export.merge_dtype: float32"
        )
    if changed == 0:
        raise MergeVerificationError("merging changed no weight: the adapter is empty or was not applied")

    save_merged(merged, tokenizer, work_dir / MODEL, cfg.export.max_shard_size)
    base_model_hash = FileHasher().tree(Path(cfg.base_model))
    lineage = {
        "base_model": cfg.base_model,
        "base_model_sha256": base_model_hash,
        "data_fingerprint": prep_fingerprint,
        "train_fingerprint": train_fingerprint,
        "eval_fingerprint": eval_fingerprint,
        "code_version": code_version("prep", "train", "eval", "export", "merge"),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (work_dir / MODEL / "README.md").write_text(model_card(cfg, lineage, eval_manifest), encoding="utf-8")
    manifest = {
        "stage": "export",
        "fingerprint": fingerprint,
        "model_dir": MODEL,
        "merge_dtype": cfg.export.merge_dtype,
        "max_logit_diff": max_logit_diff,
        "weights_changed": changed,
        "lineage": lineage,
        "duration_s": round(time.monotonic() - started, 2),
    }
    log.info("export: merged (%d tensors changed), max logit diff %.3g", changed, max_logit_diff)
    return store.publish(work_dir, final_dir, manifest)


def model_card(cfg: RunConfig, lineage: dict[str, Any], eval_manifest: dict[str, Any]) -> str:
    settings = {stage: stage_settings(cfg, stage) for stage in ("prep", "train", "eval", "export")}
    return (
        f"# {cfg.name}\n\n"
        f"LoRA fine-tune of `{cfg.base_model}`, merged into the base weights ({cfg.export.merge_dtype}) by loraflow.\n\n"
        "## Lineage\n\n```json\n" + json.dumps(lineage, indent=2) + "\n```\n\n"
        "## Eval metrics\n\n```json\n" + json.dumps(eval_manifest["metrics"], indent=2) + "\n```\n\n"
        "## Config\n\n```json\n" + json.dumps(settings, indent=2) + "\n```\n"
    )


def link_output(cfg: RunConfig, export_dir: Path, manifest: dict[str, Any]) -> Path:
    """Points `<output_dir>/model` at the exported model with an atomic symlink swap."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    link = output_dir / MODEL
    temporary = output_dir / f".{MODEL}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to((export_dir / manifest["model_dir"]).resolve(), target_is_directory=True)
    os.replace(temporary, link)
    return link


@task(name="export", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def export_task(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, train_fingerprint: str, eval_fingerprint: str) -> dict[str, Any]:
    return run_export(cfg, fingerprint, prep_fingerprint, train_fingerprint, eval_fingerprint)
