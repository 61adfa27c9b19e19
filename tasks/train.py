"""train: LoRA / QLoRA with peft and the transformers Trainer on packed rows, resumable.

The Trainer owns devices, precision, checkpointing and resumption; this module decides what it is
given. Training runs inside the stage's `.partial` directory, whose checkpoints survive a crash:
the next run resumes from the newest complete one and reaches the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks import store
from tasks.config import RunConfig, stage_settings
from tasks.fingerprint import FileHasher, code_version, hash_json
from tasks.packing import PackedCollator
from tasks.shards import load_shards

log = logging.getLogger("loraflow.train")

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"


def fingerprint(cfg: RunConfig, prep_fingerprint: str, hasher: FileHasher) -> str:
    return hash_json({
        "settings": stage_settings(cfg, "train"),
        "prep": prep_fingerprint,
        "base_model": hasher.tree(Path(cfg.base_model)),
        "code": code_version("train", "packing", "shards"),
    })


def latest_complete_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest checkpoint whose trainer state (the Trainer's last file) is readable JSON."""
    candidates = sorted(
        (path for path in checkpoint_root.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()),
        key=lambda path: int(path.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return candidate
    return None


def run_train(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, callbacks: list[Any] | None = None) -> dict[str, Any]:
    final_dir = store.stage_dir(cfg, "train", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    started = time.monotonic()
    prep_manifest = store.require_manifest(cfg, "prep", prep_fingerprint)
    prep_dir = store.stage_dir(cfg, "prep", prep_fingerprint)
    work_dir = store.partial_dir(final_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer, Trainer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    model = load_model_for_training(cfg)
    train_rows = load_shards(prep_dir, prep_manifest["train_shards"])
    val_rows = load_shards(prep_dir, prep_manifest["val_shards"]) if prep_manifest["val_rows"] else None

    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, work_dir / CHECKPOINTS, has_val=val_rows is not None),
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    resume_from = latest_complete_checkpoint(work_dir / CHECKPOINTS)
    if resume_from is not None:
        log.info("train: resuming from %s", resume_from.name)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    eval_metrics = trainer.evaluate() if val_rows is not None else {}

    model.save_pretrained(work_dir / ADAPTER)
    tokenizer.save_pretrained(work_dir / ADAPTER)
    history = trainer.state.log_history
    with (work_dir / "metrics.jsonl").open("w") as handle:
        for record in history:
            handle.write(json.dumps(record) + "\n")
    train_losses = [record["loss"] for record in history if "loss" in record]
    eval_loss = eval_metrics.get("eval_loss")
    manifest = {
        "stage": "train",
        "fingerprint": fingerprint,
        "prep_fingerprint": prep_fingerprint,
        "adapter_dir": ADAPTER,
        "adapter": cfg.adapter,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": train_losses[0] if train_losses else None,
        "last_logged_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "duration_s": round(time.monotonic() - started, 2),
    }
    log.info(
        "train: %d steps, train loss %.4f, eval loss %s", manifest["global_step"], result.training_loss,
        f"{eval_loss:.4f}" if eval_loss is not None else "n/a",
    )
    return store.publish(work_dir, final_dir, manifest)


def compute_dtype(cfg: RunConfig) -> Any:
    import torch

    return torch.bfloat16 if cfg.bf16 else torch.float32


def load_model_for_training(cfg: RunConfig) -> Any:
    """The base model with LoRA adapters attached; 4-bit nf4 base weights for QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    load_options: dict[str, Any] = {
        "dtype": compute_dtype(cfg),
        "attn_implementation": "flash_attention_2" if cfg.flash_attention else "sdpa",
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        load_options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(cfg),
        )
        if torch.cuda.is_available():
            load_options["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **load_options)
    # Packed rows are only kept apart when no KV cache is in use.
    model.config.use_cache = False
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        _keep_cpu_4bit_layers_trainable(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        modules_to_save=cfg.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _keep_cpu_4bit_layers_trainable(model: Any) -> None:
    """bitsandbytes on CPUs with avx512_bf16 repacks a 4-bit weight the first time it runs under
    no_grad (e.g. during evaluation), after which gradients stop flowing through it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def training_arguments(cfg: RunConfig, checkpoint_dir: Path, has_val: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        tf32=cfg.tf32 if torch.cuda.is_available() else None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_steps and has_val else "no",
        eval_steps=cfg.eval_steps,
        include_num_input_tokens_seen=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # transformers 5 reads a float below 1 as a fraction of the total steps.
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
    )


@task(name="train", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def train_task(cfg: RunConfig, fingerprint: str, prep_fingerprint: str) -> dict[str, Any]:
    from tasks.progress import PrefectProgressCallback

    return run_train(cfg, fingerprint, prep_fingerprint, callbacks=[PrefectProgressCallback(cfg.name)])
