"""export: merge the adapter into the base weights, prove the merged model equals the adapter
model, and write safetensors + tokenizer + generation config + a model card with lineage.

What the stage guarantees (or it fails, publishing nothing):
- The published model is the trained one. Before publishing, the model is saved, loaded back from
  the saved files with `AutoModelForCausalLM`, and compared with the adapter model on
  `export.verify_prompts` val prompts: the largest logit difference must stay within
  `LOGIT_TOLERANCE` for the dtype, and greedy generations (`verify_max_new_tokens` tokens) must be
  identical. For QLoRA the adapter model is the one that was trained (adapter on the nf4 base) and
  the merge goes into the de-quantized nf4 weights (see tasks/merge.py).
- The merge did something: every weight whose adapter delta is non-zero must differ from the base
  weight after the merge (in bf16/fp16 a tiny delta can vanish in rounding), and an all-zero adapter
  is refused.
- `export.adapter_only`: the adapter in PEFT format instead, checked the same way after loading it
  back with `PeftModel.from_pretrained`.
- Atomic: everything is written into `<fingerprint>.partial/` and renamed into place after
  `manifest.json`; a process killed at any moment leaves no partial model where a reader looks.
- Optional inference formats (`export.quantize`: GPTQ / AWQ, nf4, GGUF), written next to the merged
  model and each checked against it after reloading (tasks/inference_formats.py).

Errors: `MergeVerificationError` (the merged model does not reproduce the adapter model),
`ExportError` (nothing to verify with, adapter files missing),
`tasks.inference_formats.QuantizedExportError`, and `tasks.merge.MergeError`.

The model card and its lineage are written by `tasks/model_card.py`. Promotion into the model
registry is a separate, uncached step (`tasks/promotion.py`): its decision depends on the current
production version, not only on this stage's inputs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tasks import atomic, hub, inference_formats, model_card, store
from tasks.config import ExportConfig, RunConfig
from tasks.errors import StageFailedError
from tasks.eval import load_eval_items
from tasks.fingerprint import FileHasher
from tasks.merge import (
    ModelOutputs,
    dequantize_into,
    end_of_turn_token_ids,
    load_adapter_model,
    load_base,
    max_logit_difference,
    merge_into,
    model_outputs,
    record_adapter_deltas,
    save_merged,
    torch_dtype,
    unchanged_weights,
)
from tasks.quantization import compute_dtype_name

log = logging.getLogger("loraflow.export")

MODEL = "model"
# Largest logit difference accepted between the reloaded merged model and the adapter model, per
# dtype, relative to the largest reference logit (at least 1). A merge adds B@A to W and rounds
# once, where the adapter model rounds W@x and B@(A@x) separately, so the two differ by the dtype's
# own rounding noise times the logit scale. Measured (relative): a trained adapter on the tiny
# model (tests/test_export.py) float32 5.7e-7, bfloat16 6.2e-3, float16 7.8e-4; a random adapter on
# random prompts (benchmarks/merge.py, the worst case: flat logits) float32 2.8e-6, bfloat16 3.1e-2,
# float16 4.1e-3, which is what the bfloat16 adapter model itself differs from the float32 one
# (3.2e-2): the merge adds no error beyond the dtype's. The 16-bit tolerances are 25.6 units of
# rounding (2^-8 and 2^-11 relative); float32's difference comes from summation order, not
# rounding of weights, and grows with the hidden size, so it gets a fixed 1e-4 (20x the 1.1B
# random Llama's 5.0e-6). What the tolerance catches depends on the dtype: a missing or doubly
# applied adapter moves the tiny model's logits by about 1.0 relative, caught in every dtype; a
# QLoRA adapter merged into the original instead of the de-quantized weights moves them by 0.1 to
# 0.5, caught in float32 and float16 but within bfloat16's own noise, which is why the greedy
# generations must match as well and why float32 is the default merge dtype.
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.0125}
class ExportError(StageFailedError):
    """The export cannot start or complete; the message says what is missing and what to do."""


class MergeVerificationError(ExportError):
    """The merged (or exported) model does not reproduce the adapter model."""


def build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    """The export stage: the verified model, its model card and the manifest fields."""
    train_manifest, eval_manifest = upstream["train"], upstream["eval"]
    adapter_dir = store.output_dir(cfg, train_manifest) / train_manifest["adapter_dir"]
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir} holds no adapter_config.json; re-run training (`loraflow run CONFIG --refresh train`)")
    items = verify_items(store.output_dir(cfg, upstream["prep"]), upstream["prep"], cfg.export.verify_prompts)
    if not items:
        raise ExportError("export verifies the merge on prompts from prep, but prep kept no conversation to take them from")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    prompts = [
        tokenizer(item["text"], return_tensors="pt")["input_ids"] if "text" in item else
        tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True, return_tensors="pt")["input_ids"]
        for item in items
    ]
    qlora = train_manifest.get("adapter") == "qlora"
    # LoRA: the adapter on the base in the merge dtype. QLoRA: the model as trained (nf4 base).
    reference_dtype = compute_dtype_name(cfg) if qlora else cfg.export.merge_dtype
    export_one = _export_adapter if cfg.export.adapter_only else _export_merged
    verification, merged_outputs = export_one(cfg, adapter_dir, tokenizer, prompts, work_dir / MODEL, qlora, reference_dtype)
    formats_dir = work_dir / inference_formats.FORMATS_DIR
    formats = inference_formats.export_formats(
        cfg, work_dir / MODEL, formats_dir, tokenizer, prompts, merged_outputs,
        verify_items(store.output_dir(cfg, upstream["prep"]), upstream["prep"], cfg.export.calibration_samples),
    ) if cfg.export.quantize else {}

    metrics = {
        **eval_manifest["metrics"],
        "eval_loss": eval_manifest.get("eval_loss"),
        "eval_perplexity": eval_manifest.get("eval_perplexity"),
    }
    lineage = model_card.lineage(cfg, upstream)
    kind = "adapter" if cfg.export.adapter_only else "merged"
    atomic.write_text(work_dir / MODEL / "README.md", model_card.render(cfg, kind, lineage, verification, metrics, formats))
    manifest = {
        "model_dir": MODEL,
        "model_sha256": FileHasher().tree(work_dir / MODEL),
        "kind": kind,
        "merge_dtype": cfg.export.merge_dtype,
        "max_logit_diff": verification["max_logit_diff"],
        "weights_changed": verification["weights_changed"],
        "verification": verification,
        "formats": formats,
        "formats_sha256": inference_formats.format_digests(formats_dir, formats),
        "metrics": metrics,
        "lineage": lineage,
    }
    log.info(
        "export: %s model verified on %d prompts (max logit diff %.3g, %d weights changed, merge %.2f s)",
        kind, verification["prompts"], verification["max_logit_diff"], verification["weights_changed"], verification["merge_s"],
    )
    return manifest


def verify_items(prep_dir: Path, prep_manifest: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Prompts to verify the merge on: val items, else the pinned test set's, else (`val_set_size: 0`)
    the few training conversations prep keeps for this."""
    for file_name in ("val_messages.jsonl", prep_manifest.get("test_items"), prep_manifest.get("probe_items")):
        if file_name and (prep_dir / file_name).is_file() and (items := load_eval_items(prep_dir, count, file_name, with_text=True)):
            return items
    return []


def _export_merged(
    cfg: RunConfig, adapter_dir: Path, tokenizer: Any, prompts: list[Any], out_dir: Path, qlora: bool, reference_dtype: str
) -> tuple[dict[str, Any], ModelOutputs]:
    """The merged model written to `out_dir` and verified; its reloaded outputs are what the
    inference formats are compared with."""
    from transformers import AutoModelForCausalLM

    settings = cfg.export
    adapter_model, reference, stop_ids, pad_id = _trained_model_outputs(cfg, adapter_dir, tokenizer, prompts, qlora, reference_dtype)

    merge_started = time.monotonic()
    if qlora:
        base = load_base(hub.base_model_dir(cfg), settings.merge_dtype, cfg.trust_remote_code)
        dequantize_into(adapter_model.get_base_model(), base)
        del adapter_model
        merged, changes = merge_into(base, adapter_dir)
    else:
        changes = record_adapter_deltas(adapter_model)
        merged = adapter_model.merge_and_unload()
    merge_s = time.monotonic() - merge_started
    save_merged(merged, tokenizer, out_dir, settings.max_shard_size)
    del merged

    # Verify what was written, not the object in memory: the files are what users get.
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch_dtype(settings.merge_dtype), trust_remote_code=cfg.trust_remote_code
    )
    reloaded.eval()
    candidate = model_outputs(reloaded, prompts, settings.verify_max_new_tokens, stop_ids, pad_id)
    unchanged = unchanged_weights(reloaded, changes)
    del reloaded
    return verify(
        reference, candidate, tokenizer, changes.nonzero_delta, unchanged, settings, reference_dtype, merge_s,
        reference_name=f"adapter on the {'nf4-quantized' if qlora else ''} base ({reference_dtype})".replace("  ", " "),
    ), candidate


def _trained_model_outputs(
    cfg: RunConfig, adapter_dir: Path, tokenizer: Any, prompts: list[Any], qlora: bool, reference_dtype: str
) -> tuple[Any, ModelOutputs, list[int], int]:
    """The model as trained (adapter on its base, nf4 for QLoRA) and its outputs on the verify
    prompts: the reference every exported form is checked against."""
    stop_ids = end_of_turn_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    adapter_model = load_adapter_model(hub.base_model_dir(cfg), adapter_dir, reference_dtype, cfg.trust_remote_code, load_in_4bit=qlora)
    return adapter_model, model_outputs(adapter_model, prompts, cfg.export.verify_max_new_tokens, stop_ids, pad_id), stop_ids, pad_id


def _export_adapter(
    cfg: RunConfig, adapter_dir: Path, tokenizer: Any, prompts: list[Any], out_dir: Path, qlora: bool, reference_dtype: str
) -> tuple[dict[str, Any], None]:
    settings = cfg.export
    adapter_model, reference, stop_ids, pad_id = _trained_model_outputs(cfg, adapter_dir, tokenizer, prompts, qlora, reference_dtype)
    changes = record_adapter_deltas(adapter_model)
    del adapter_model

    out_dir.mkdir(parents=True)
    for path in adapter_dir.iterdir():
        if path.is_file() and path.name != "README.md":  # peft's stub card; ours replaces it
            shutil.copy2(path, out_dir / path.name)
    exported = load_adapter_model(hub.base_model_dir(cfg), out_dir, reference_dtype, cfg.trust_remote_code, load_in_4bit=qlora)
    candidate = model_outputs(exported, prompts, settings.verify_max_new_tokens, stop_ids, pad_id)
    del exported
    verification = verify(
        reference, candidate, tokenizer, changes.nonzero_delta, [], settings, reference_dtype, 0.0,
        reference_name=f"adapter from the train stage ({reference_dtype})",
    )
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    notes = []
    if adapter_config.get("modules_to_save"):
        notes.append(f"modules_to_save {adapter_config['modules_to_save']} are full weights: vLLM --lora-modules does not load them")
    if adapter_config.get("use_dora"):
        notes.append("DoRA adapters are not served by vLLM --lora-modules")
    if qlora:
        notes.append("trained against an nf4-quantized base: load the base with load_in_4bit (nf4, double quant) to reproduce it")
    return {**verification, "notes": notes}, None


def verify(
    reference: ModelOutputs,
    candidate: ModelOutputs,
    tokenizer: Any,
    nonzero_delta: dict[str, bool],
    unchanged: list[str],
    settings: ExportConfig,
    reference_dtype: str,
    merge_s: float,
    reference_name: str,
) -> dict[str, Any]:
    """Raises MergeVerificationError unless the candidate reproduces the reference; returns the figures."""
    adapted = sum(nonzero_delta.values())
    if adapted == 0:
        raise MergeVerificationError(
            f"every one of the adapter's {len(nonzero_delta)} LoRA layers is zero: training did not update it "
            "(check learning_rate, max_steps and that the loss has trainable tokens)"
        )
    if unchanged:
        raise MergeVerificationError(
            f"the merge left {len(unchanged)} weight(s) unchanged although their adapter delta is non-zero "
            f"(e.g. {unchanged[0]}): in {settings.merge_dtype} the delta is below the weights' rounding; "
            "use export.merge_dtype: float32"
        )
    # The coarser of the two dtypes bounds how closely they can agree.
    relative_tolerance = max(LOGIT_TOLERANCE[settings.merge_dtype], LOGIT_TOLERANCE[reference_dtype])
    logit_scale = max(1.0, max(float(logits.abs().max()) for logits in reference.logits))
    tolerance = relative_tolerance * logit_scale
    max_diff = max_logit_difference(reference, candidate)
    if max_diff > tolerance:
        raise MergeVerificationError(
            f"exported model differs from the {reference_name}: max logit difference {max_diff:.3g} > tolerance "
            f"{tolerance:.3g} ({relative_tolerance:g} x largest logit {logit_scale:.3g}) for {settings.merge_dtype}; "
            "try export.merge_dtype: float32"
        )
    for index, (expected, got) in enumerate(zip(reference.generations, candidate.generations)):
        if expected != got:
            raise MergeVerificationError(
                f"greedy generation on verify prompt {index} differs from the {reference_name}: expected "
                f"{tokenizer.decode(expected)!r}, got {tokenizer.decode(got)!r} (max logit difference {max_diff:.3g}); "
                "try export.merge_dtype: float32"
            )
    return {
        "prompts": len(reference.logits),
        "reference": reference_name,
        "reference_dtype": reference_dtype,
        "merge_dtype": settings.merge_dtype,
        "max_logit_diff": max_diff,
        "largest_logit": logit_scale,
        "relative_logit_diff": max_diff / logit_scale,
        "tolerance": tolerance,
        "generations_match": len(reference.generations),
        "max_new_tokens": settings.verify_max_new_tokens,
        "adapted_weights": adapted,
        "weights_changed": adapted - len(unchanged),
        "merge_s": round(merge_s, 3),
    }


def link_output(cfg: RunConfig, export_dir: Path, manifest: dict[str, Any]) -> Path:
    """Points `<output_dir>/model` at the exported model with an atomic symlink swap."""
    link = Path(cfg.output_dir) / MODEL
    atomic.replace_symlink(link, (export_dir / manifest["model_dir"]).resolve())
    return link
