"""train: LoRA / QLoRA with peft and the transformers Trainer on packed rows, resumable.

The Trainer owns devices, precision, the optimizer and the data order; this module decides what it
is given, when a checkpoint counts as complete, and how the val split is scored. What a user can
rely on:

- Training runs inside the stage's `.partial` directory. Every `save_steps` a checkpoint (adapter,
  optimizer, scheduler, RNG states, data position) is written and then marked complete; only
  `save_total_limit` complete ones are kept. After a crash, the next run resumes from the newest
  complete checkpoint, logs "resuming from step N" and records `resumed_from_step`; on a CPU its
  adapter and loss curve equal an uninterrupted run's bit for bit.
- `eval_loss` is token-weighted over the whole val split (sum of token losses / trained tokens),
  so packed and unpacked val rows of the same samples score the same.
- QLoRA trains on a CPU too (nf4, double quant, fp32 compute), also across evaluations.
- Errors: `TrainError` for a setting this machine cannot run, `TrainingOutOfMemoryError` with the
  settings to turn when memory runs out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import task
from transformers import Trainer, TrainerCallback

from tasks import store
from tasks.config import RunConfig, stage_settings
from tasks.fingerprint import FileHasher, code_version, hash_json
from tasks.memory import GPU_ONLY_OPTIMIZERS, out_of_memory_advice, read_model_config
from tasks.packing import IGNORE_INDEX, PackedCollator
from tasks.progress import MetricsRecorder, metric_records, save_loss_curve, terminal_progress_bar, write_jsonl_atomic
from tasks.shards import load_shards

log = logging.getLogger("loraflow.train")

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
# Written after every other file of a checkpoint is on disk: a checkpoint without it is torn.
COMPLETE_MARKER = "checkpoint_complete.json"


class TrainError(RuntimeError):
    """Training cannot run as configured; the message names the setting and the fix."""


class TrainingOutOfMemoryError(TrainError):
    """Training ran out of memory; the message lists the settings that lower the peak."""


def fingerprint(cfg: RunConfig, prep_fingerprint: str, hasher: FileHasher) -> str:
    return hash_json({
        "settings": stage_settings(cfg, "train"),
        "prep": prep_fingerprint,
        "base_model": hasher.tree(Path(cfg.base_model)),
        "code": code_version("train", "progress", "packing", "shards"),
    })


def run_train(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, callbacks: list[Any] | None = None) -> dict[str, Any]:
    final_dir = store.stage_dir(cfg, "train", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    started = time.monotonic()
    prep_manifest = store.require_manifest(cfg, "prep", prep_fingerprint)
    prep_dir = store.stage_dir(cfg, "prep", prep_fingerprint)
    work_dir = store.partial_dir(final_dir)
    checkpoint_root = work_dir / CHECKPOINTS
    checkpoint_root.mkdir(parents=True, exist_ok=True)

    import torch
    from accelerate.utils.memory import should_reduce_batch_size
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    if cfg.optimizer in GPU_ONLY_OPTIMIZERS and not torch.cuda.is_available():
        raise TrainError(f"`optimizer: {cfg.optimizer}` needs a CUDA GPU and none is visible; use `optimizer: adamw_torch`")
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    model = load_model_for_training(cfg)
    train_rows = load_shards(prep_dir, prep_manifest["train_shards"])
    val_rows = load_shards(prep_dir, prep_manifest["val_shards"]) if prep_manifest["val_rows"] else None

    resume_from = latest_complete_checkpoint(checkpoint_root)
    resumed_from_step = checkpoint_step(resume_from) if resume_from else None
    discard_checkpoints_after(checkpoint_root, resumed_from_step or 0)
    if resume_from is not None:
        log.info("train: resuming from step %d (%s)", resumed_from_step, resume_from)

    progress_bar = terminal_progress_bar()
    trainer = PackedRowsTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_root, has_val=val_rows is not None),
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[
            MetricsRecorder(work_dir / METRICS), CheckpointKeeper(cfg.save_total_limit),
            *([progress_bar] if progress_bar else []), *(callbacks or []),
        ],
    )
    # Our log lines and metrics.jsonl replace the Trainer's printed dicts.
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        final_eval = final_evaluation(trainer) if val_rows is not None else {}
    except RuntimeError as error:  # torch.OutOfMemoryError is one; so is a CPU allocator failure
        if should_reduce_batch_size(error):
            raise TrainingOutOfMemoryError(out_of_memory_advice(cfg, read_model_config(cfg))) from error
        raise

    model.save_pretrained(work_dir / ADAPTER)
    tokenizer.save_pretrained(work_dir / ADAPTER)
    records = metric_records(trainer.state.log_history)
    write_jsonl_atomic(work_dir / METRICS, records)
    save_loss_curve(records, work_dir / LOSS_CURVE, title=f"{cfg.name}: {cfg.adapter}, {trainer.state.global_step} steps")
    # A finished stage never resumes: its checkpoints are dead weight in the published output
    # (report_to's TensorBoard logs, under checkpoints/runs, stay).
    for checkpoint in _checkpoints(checkpoint_root):
        shutil.rmtree(checkpoint)

    train_records = [record for record in records if "loss" in record]
    eval_loss = final_eval.get("eval_loss")
    manifest = {
        "stage": "train",
        "fingerprint": fingerprint,
        "prep_fingerprint": prep_fingerprint,
        "adapter_dir": ADAPTER,
        "adapter": cfg.adapter,
        "attn_implementation": choose_attn_implementation(cfg),
        "resumed_from_step": resumed_from_step,
        "global_step": trainer.state.global_step,
        "train_loss": mean_step_loss(train_records),
        "first_logged_loss": train_records[0]["loss"] if train_records else None,
        "last_logged_loss": train_records[-1]["loss"] if train_records else None,
        "eval_loss": eval_loss,
        "eval_perplexity": final_eval.get("eval_perplexity"),
        "eval_tokens": final_eval.get("eval_tokens"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "metrics_file": METRICS,
        "loss_curve": LOSS_CURVE,
        "duration_s": round(time.monotonic() - started, 2),
    }
    log.info(
        "train: %d steps, train loss %.4f, eval loss %s", manifest["global_step"], manifest["train_loss"] or math.nan,
        f"{eval_loss:.4f}" if eval_loss is not None else "n/a",
    )
    return store.publish(work_dir, final_dir, manifest)


def final_evaluation(trainer: Trainer) -> dict[str, Any]:
    """The val split scored at the last step; reuses an evaluation that ran at that step already."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return last
    return trainer.evaluate()


def mean_step_loss(train_records: list[dict[str, Any]]) -> float | None:
    """Mean loss over all steps, from the logged interval means (the last step is always logged).

    Computed from metrics.jsonl rather than taken from the Trainer, whose figure after a resume
    covers only the steps of the resumed session."""
    if not train_records:
        return None
    previous_step, total = 0, 0.0
    for record in train_records:
        total += record["loss"] * (record["step"] - previous_step)
        previous_step = record["step"]
    return total / previous_step


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def _checkpoints(checkpoint_root: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    found = [path for path in checkpoint_root.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return json.loads((checkpoint / COMPLETE_MARKER).read_text())["step"] == checkpoint_step(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_complete_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest checkpoint that carries its completion marker (written after all its files)."""
    return next((path for path in _checkpoints(checkpoint_root) if is_complete(path)), None)


def discard_checkpoints_after(checkpoint_root: Path, step: int) -> None:
    """Torn checkpoints newer than the resume point: the resumed run writes them again."""
    for path in _checkpoints(checkpoint_root):
        if checkpoint_step(path) > step:
            log.info("train: discarding incomplete %s", path.name)
            shutil.rmtree(path)


class CheckpointKeeper(TrainerCallback):
    """Marks each checkpoint complete once its files are flushed, then rotates by `save_total_limit`.

    The Trainer writes a checkpoint's files in place and would rotate before anyone can tell a
    whole checkpoint from a torn one; here the marker is the checkpoint's last file, and only
    complete checkpoints count toward the limit, so a crash at any moment leaves the newest
    complete checkpoint in place.
    """

    def __init__(self, save_total_limit: int | None) -> None:
        self.save_total_limit = save_total_limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for path in checkpoint.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        store.write_json_atomic(checkpoint / COMPLETE_MARKER, {"step": state.global_step})
        directory = os.open(checkpoint, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        if self.save_total_limit:
            complete = [path for path in _checkpoints(checkpoint.parent) if is_complete(path)]
            for path in complete[self.save_total_limit:]:
                shutil.rmtree(path)


# --- evaluation ---------------------------------------------------------------------------------


def token_weighted_loss(model: Any, rows: Any, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """Sum of token losses over `rows` divided by their number of trained tokens; returns (loss, tokens).

    Rows are batched with `PackedCollator`: no attention mask, position_ids from the rows and
    `use_cache=False`, so packed samples stay apart. Unlike the Trainer's mean of per-batch means,
    the result does not depend on how samples were packed or batched. Runs in eval mode without
    gradients and restores the model's mode afterwards.
    """
    import torch
    import torch.nn.functional as F

    collate = PackedCollator(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate([rows[index] for index in range(start, min(start + batch_size, len(rows)))])
                logits = model(
                    input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False
                ).logits
                targets = batch["labels"][:, 1:].to(device)
                losses = F.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                loss_sum += float(losses.double())
                tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise TrainError("the val split has no trained tokens to score; check the prep manifest's val rows")
    return loss_sum / tokens, tokens


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 50 else None


class PackedRowsTrainer(Trainer):
    """The Trainer, with evaluation replaced by the token-weighted loss over the whole val split."""

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, Any]:
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        loss, tokens = token_weighted_loss(
            self.model, rows, self.data_collator.pad_token_id, self.args.per_device_eval_batch_size
        )
        metrics = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": perplexity(loss),
            f"{metric_key_prefix}_tokens": tokens,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# --- model and arguments ------------------------------------------------------------------------


def compute_dtype(cfg: RunConfig) -> Any:
    """bf16 where asked (preflight allows it on capable GPUs only); fp32 otherwise, QLoRA on a CPU included."""
    import torch

    return torch.bfloat16 if cfg.bf16 else torch.float32


def choose_attn_implementation(cfg: RunConfig) -> str:
    """From config and hardware. Each choice builds its mask from position_ids when no attention
    mask is given, so packed samples never attend to each other (tested for SDPA and eager)."""
    import importlib.util

    import torch

    if cfg.flash_attention:
        return "flash_attention_2"
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if not torch.cuda.is_available():
        return "sdpa"
    if cfg.bf16 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention"


def load_model_for_training(cfg: RunConfig) -> Any:
    """The base model with LoRA adapters attached; 4-bit nf4 base weights (double quant) for QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    load_options: dict[str, Any] = {
        "dtype": compute_dtype(cfg),
        "attn_implementation": choose_attn_implementation(cfg),
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
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_cpu_4bit_layers_trainable(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        modules_to_save=cfg.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def keep_cpu_4bit_layers_trainable(model: Any) -> None:
    """bitsandbytes on CPUs with avx512_bf16 repacks a 4-bit weight into an inference-only layout
    the first time the layer runs in eval mode on input that needs no grad (an evaluation); after
    that, no gradient flows through the layer. Switching that repacking off keeps training exact."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def reporting_integrations(cfg: RunConfig) -> list[str]:
    """`report_to`, less the integrations that are not installed (each one named in a warning)."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for name in cfg.report_to:
        if name not in available:
            log.warning("train: report_to %s skipped: it is not installed (pip install %s)", name, name)
    return [name for name in cfg.report_to if name in available]


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
        # Named only when on: transformers 5.2x warns about the (still working) name whenever it is set.
        **(
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
            if cfg.gradient_checkpointing else {}
        ),
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        # CheckpointKeeper rotates, counting complete checkpoints only.
        save_total_limit=None,
        eval_strategy="steps" if cfg.eval_steps and has_val else "no",
        eval_steps=cfg.eval_steps,
        include_num_input_tokens_seen=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to=reporting_integrations(cfg) or "none",
        torch_compile=cfg.torch_compile,
        use_liger_kernel=cfg.liger_kernel,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # transformers 5 reads a float below 1 as a fraction of the total steps.
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
    )


@task(name="train", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def train_task(cfg: RunConfig, fingerprint: str, prep_fingerprint: str) -> dict[str, Any]:
    from tasks.progress import PrefectProgressCallback

    return run_train(cfg, fingerprint, prep_fingerprint, callbacks=[PrefectProgressCallback(cfg.name)])
