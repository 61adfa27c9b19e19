"""train: LoRA / QLoRA with peft and the transformers Trainer on packed rows, resumable.

The Trainer owns devices, precision, the optimizer and the data order; this module decides what it
is given and how the val split is scored (`tasks/checkpoints.py` decides when a checkpoint
counts). What a user can rely on:

- Training runs inside the stage's `.partial` directory. Every `save_steps` a checkpoint (adapter,
  optimizer, scheduler, RNG states, data position) is written and then marked complete; only
  `save_total_limit` complete ones are kept. After a crash, the next run resumes from the newest
  complete checkpoint, logs "resuming from step N" and records `resumed_from_step`; on a CPU its
  adapter and loss curve equal an uninterrupted run's bit for bit.
- `eval_loss` is token-weighted over the whole val split (sum of token losses / trained tokens),
  so packed and unpacked val rows of the same samples score the same.
- QLoRA trains on a CPU too (nf4, double quant, fp32 compute), also across evaluations.
- Several processes (GPUs, `num_processes`, DeepSpeed, FSDP) train through `accelerate launch`
  (`tasks/launch.py`) with the same checkpoints, resumption, metrics and manifest; the val split
  is scored in each process (every process must take part in sharded forward passes).
- Errors: `TrainError` for a setting this machine cannot run, `TrainingOutOfMemoryError` with the
  settings to turn when memory runs out.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from prefect import task
from transformers import Trainer

from tasks import store
from tasks.checkpoints import CheckpointKeeper, checkpoint_step, discard_all, latest_complete_checkpoint, prepare_resume
from tasks.config import RunConfig, stage_settings
from tasks.fingerprint import FileHasher, code_version, hash_json
from tasks.launch import plan_processes, read_deepspeed_config, run_launched, zero_stage
from tasks.memory import GPU_ONLY_OPTIMIZERS, out_of_memory_advice, read_model_config, visible_gpus
from tasks.packing import IGNORE_INDEX, PackedCollator
from tasks.progress import METRICS, MetricsRecorder, metric_records, save_loss_curve, terminal_progress_bar, write_jsonl_atomic
from tasks.shards import load_shards

log = logging.getLogger("loraflow.train")

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
LOSS_CURVE = "loss_curve.png"


class TrainError(RuntimeError):
    """Training cannot run as configured; the message names the setting and the fix."""


class TrainingOutOfMemoryError(TrainError):
    """Training ran out of memory; the message lists the settings that lower the peak."""


def fingerprint(cfg: RunConfig, prep_fingerprint: str, hasher: FileHasher) -> str:
    plan = plan_processes(cfg)
    return hash_json({
        "settings": stage_settings(cfg, "train"),
        "prep": prep_fingerprint,
        "base_model": hasher.tree(Path(cfg.base_model)),
        # The effective batch is per process: other process counts train another model.
        "processes": plan.processes,
        "deepspeed": read_deepspeed_config(cfg) if cfg.deepspeed else None,
        "code": code_version("train", "checkpoints", "launch", "progress", "packing", "shards"),
    })


def run_train(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """The train stage: its manifest, from a finished output or after training (resumed when a
    killed run left checkpoints). Trains here, or in processes started with `accelerate launch`."""
    final_dir = store.stage_dir(cfg, "train", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    if cfg.optimizer in GPU_ONLY_OPTIMIZERS and not visible_gpus():
        raise TrainError(f"`optimizer: {cfg.optimizer}` needs a CUDA GPU and none is visible; use `optimizer: adamw_torch`")
    store.require_manifest(cfg, "prep", prep_fingerprint)
    work_dir = store.partial_dir(final_dir)
    checkpoint_root = work_dir / CHECKPOINTS
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    prepare_resume(checkpoint_root)
    plan = plan_processes(cfg)
    if not plan.launched:
        return train_and_publish(cfg, fingerprint, prep_fingerprint, callbacks)
    run_launched(cfg, plan, fingerprint, prep_fingerprint, work_dir, callbacks or [])
    manifest = store.read_manifest(final_dir)
    if manifest is None:
        raise TrainError(f"the training processes exited cleanly but published no output in {final_dir}")
    return manifest


def train_and_publish(cfg: RunConfig, fingerprint: str, prep_fingerprint: str, callbacks: list[Any] | None = None) -> dict[str, Any] | None:
    """Trains from the newest complete checkpoint (if any) and publishes the stage's output.

    Runs in every training process; the main process writes metrics and the output and returns the
    manifest, the others return None."""
    started = time.monotonic()
    final_dir = store.stage_dir(cfg, "train", fingerprint)
    prep_manifest = store.require_manifest(cfg, "prep", prep_fingerprint)
    prep_dir = store.stage_dir(cfg, "prep", prep_fingerprint)
    work_dir = store.partial_dir(final_dir)
    checkpoint_root = work_dir / CHECKPOINTS

    import torch
    from accelerate.utils.memory import should_reduce_batch_size
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(cfg.seed)
    train_rows = load_shards(prep_dir, prep_manifest["train_shards"])
    val_rows = load_shards(prep_dir, prep_manifest["val_shards"]) if prep_manifest["val_rows"] else None
    # Before the model: under ZeRO-3 the model loads straight into shards only once DeepSpeed's config exists.
    arguments = training_arguments(cfg, checkpoint_root, has_val=val_rows is not None)
    is_main_process = arguments.process_index == 0
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    model = load_model_for_training(cfg, arguments.local_process_index)
    resume_from = latest_complete_checkpoint(checkpoint_root)

    progress_bar = terminal_progress_bar() if is_main_process else None
    trainer = PackedRowsTrainer(
        model=model,
        args=arguments,
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id),
        # Callbacks that steer the Trainer (logging, saving) run in every process: their decisions
        # lead into collective operations.
        callbacks=[
            CheckpointKeeper(cfg.save_total_limit), MetricsRecorder(work_dir / METRICS),
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
            advice = out_of_memory_advice(cfg, read_model_config(cfg), arguments.world_size, zero_stage(cfg))
            raise TrainingOutOfMemoryError(advice) from error
        raise

    # Gathers sharded weights (ZeRO-3, FSDP) on every process; writes on the main one.
    trainer.save_model(str(work_dir / ADAPTER))
    if not is_main_process:
        return None
    # The Trainer's pickled arguments: not part of an adapter, and adapter-only export copies the folder.
    (work_dir / ADAPTER / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(work_dir / ADAPTER)
    records = metric_records(trainer.state.log_history)
    write_jsonl_atomic(work_dir / METRICS, records)
    save_loss_curve(records, work_dir / LOSS_CURVE, title=f"{cfg.name}: {cfg.adapter}, {trainer.state.global_step} steps")
    # A finished stage never resumes (report_to's TensorBoard logs, under checkpoints/runs, stay).
    discard_all(checkpoint_root)

    train_records = [record for record in records if "loss" in record]
    eval_loss = final_eval.get("eval_loss")
    manifest = {
        "stage": "train",
        "fingerprint": fingerprint,
        "prep_fingerprint": prep_fingerprint,
        "adapter_dir": ADAPTER,
        "adapter": cfg.adapter,
        "attn_implementation": choose_attn_implementation(cfg),
        "processes": arguments.world_size,
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
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


def load_model_for_training(cfg: RunConfig, device_index: int = 0) -> Any:
    """The base model with LoRA adapters attached; 4-bit nf4 base weights (double quant) for QLoRA.

    `device_index` is this process's GPU. When FSDP or ZeRO-3 shard the model, QLoRA's 4-bit weights
    are stored in the compute dtype (shards must share one dtype) and the sharding places them."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    sharded = cfg.fsdp_config is not None or zero_stage(cfg) == 3
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
            **({"bnb_4bit_quant_storage": compute_dtype(cfg)} if sharded else {}),
        )
        if torch.cuda.is_available() and not sharded:
            load_options["device_map"] = {"": device_index}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **load_options)
    # Packed rows are only kept apart when no KV cache is in use.
    model.config.use_cache = False
    # peft's k-bit preparation casts the unquantized weights to fp32, which sharding cannot mix with
    # the stored 4-bit weights; gradient checkpointing comes from the Trainer's arguments instead.
    if cfg.load_in_4bit and not sharded:
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
    """The Trainer's arguments. In launched processes, creating them joins the process group."""
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
        # Every LoRA weight gets a gradient at every step: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        deepspeed=str(Path(cfg.deepspeed).resolve()) if cfg.deepspeed else None,
        **({"fsdp": True, "fsdp_config": cfg.fsdp_config.model_dump()} if cfg.fsdp_config is not None else {}),
        # transformers 5 reads a float below 1 as a fraction of the total steps.
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
    )


@task(name="train", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def train_task(cfg: RunConfig, fingerprint: str, prep_fingerprint: str) -> dict[str, Any]:
    from tasks.progress import PrefectProgressCallback

    return run_train(cfg, fingerprint, prep_fingerprint, callbacks=[PrefectProgressCallback(cfg.name)])
