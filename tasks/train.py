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
from pathlib import Path
from typing import Any

from tasks import atomic, hub, store
from tasks.checkpoints import CheckpointKeeper, StopOnSigterm, checkpoint_step, discard_all, latest_complete_checkpoint, prepare_resume
from tasks.config import RunConfig
from tasks.errors import StageFailedError
from tasks.fingerprint import FileHasher
from tasks.gpu_allocator import GpuLease, acquire, host_devices
from tasks.gpus import visible_gpus
from tasks.launch import plan_processes, run_launched, zero_stage
from tasks.memory import GPU_ONLY_OPTIMIZERS, out_of_memory_advice, read_model_config
from tasks.packing import PackedCollator
from tasks.progress import METRICS, MetricsRecorder, metric_records, save_loss_curve, terminal_progress_bar
from tasks.quantization import compute_dtype, keep_cpu_4bit_layers_exact, nf4_config
from tasks.shards import load_shards

log = logging.getLogger("loraflow.train")

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
LOSS_CURVE = "loss_curve.png"


class TrainError(StageFailedError):
    """Training cannot run as configured; the message names the setting and the fix."""


class TrainingStoppedError(TrainError):
    """Training was asked to stop (SIGTERM: preemption, `kubectl delete`) and saved a checkpoint first."""


class TrainingOutOfMemoryError(TrainError):
    """Training ran out of memory; the message lists the settings that lower the peak."""


def build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any], callbacks: list[Any] | None = None) -> dict[str, Any] | None:
    """The train stage: trains (resuming when a killed run left checkpoints in `work_dir`) and
    returns the manifest fields (None on a machine other than machine 0, which only joins).

    Trains here, or in processes started with `accelerate launch`, on GPUs this job holds
    (`tasks/gpu_allocator.py`: as many as it starts processes on this machine, waiting while other
    jobs hold them). A job holding every visible GPU trains as before; one holding some of them
    trains in child processes that see only those."""
    if cfg.optimizer in GPU_ONLY_OPTIMIZERS and not visible_gpus():
        raise TrainError(f"`optimizer: {cfg.optimizer}` needs a CUDA GPU and none is visible; use `optimizer: adamw_torch`")
    checkpoint_root = work_dir / CHECKPOINTS
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    if cfg.machine_rank == 0:  # the other machines join this one's run: it alone tidies the checkpoints
        prepare_resume(checkpoint_root)
    callbacks = [*(callbacks or []), *_prefect_progress(cfg)]
    plan = plan_processes(cfg)
    with hold_gpus(cfg, plan.per_machine) as lease:
        if not plan.launched and lease.devices == tuple(gpu.index for gpu in visible_gpus()):
            result = train_in_process(cfg, work_dir, upstream["prep"], callbacks)
            assert result is not None  # a single process is the main process
            return result
        return run_launched(cfg, plan, work_dir, upstream["prep"], callbacks, lease.environment())


def hold_gpus(cfg: RunConfig, processes: int) -> GpuLease:
    """One GPU per training process on this machine, for this job alone (none on a host without GPUs)."""
    devices = host_devices()
    return acquire(processes if devices else 0, devices=devices, job=f"{cfg.name} train")


def _prefect_progress(cfg: RunConfig) -> list[Any]:
    """Progress and loss-table artifacts when training runs inside a Prefect task."""
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return []
    from tasks.progress import PrefectProgressCallback

    return [PrefectProgressCallback(cfg.name)]


def train_in_process(cfg: RunConfig, work_dir: Path, prep_manifest: dict[str, Any], callbacks: list[Any]) -> dict[str, Any] | None:
    """Trains from the newest complete checkpoint (if any) to the end and saves the adapter.

    Runs in every training process; the main process writes metrics and the adapter and returns
    the manifest fields, the others return None."""
    checkpoint_root = work_dir / CHECKPOINTS
    prep_dir = store.output_dir(cfg, prep_manifest)

    import torch
    from accelerate.utils.memory import should_reduce_batch_size
    from transformers.trainer_callback import PrinterCallback

    from tasks.tokenizer import load_tokenizer
    from tasks.trainer import PackedRowsTrainer

    torch.manual_seed(cfg.seed)
    train_rows = load_shards(prep_dir, prep_manifest["train_shards"])
    val_rows = load_shards(prep_dir, prep_manifest["val_shards"]) if prep_manifest["val_rows"] else None
    # Before the model: under ZeRO-3 the model loads straight into shards only once DeepSpeed's config exists.
    arguments = training_arguments(cfg, checkpoint_root, has_val=val_rows is not None)
    is_main_process = arguments.process_index == 0
    tokenizer = load_tokenizer(cfg, hub.base_model_dir(cfg))
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
            *([progress_bar] if progress_bar else []), *callbacks,
        ],
    )
    # Our log lines and metrics.jsonl replace the Trainer's printed dicts.
    trainer.remove_callback(PrinterCallback)
    stop_on_sigterm = StopOnSigterm()
    if arguments.world_size == 1:  # several processes must agree on the step to stop at: not done here
        trainer.add_callback(stop_on_sigterm)
    try:
        with stop_on_sigterm.installed():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stop_on_sigterm.stopped_at is not None:
            raise TrainingStoppedError(
                f"training stopped on SIGTERM at step {stop_on_sigterm.stopped_at} after saving a complete checkpoint "
                f"in {checkpoint_root}; the next run resumes from it"
            )
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
    sort_target_modules(work_dir / ADAPTER)
    tokenizer.save_pretrained(work_dir / ADAPTER)
    records = metric_records(trainer.state.log_history)
    atomic.write_jsonl(work_dir / METRICS, records)
    save_loss_curve(records, work_dir / LOSS_CURVE, title=f"{cfg.name}: {cfg.adapter}, {trainer.state.global_step} steps")
    # A finished stage never resumes (report_to's TensorBoard logs, under checkpoints/runs, stay).
    discard_all(checkpoint_root)

    train_records = [record for record in records if "loss" in record]
    eval_loss = final_eval.get("eval_loss")
    manifest = {
        "adapter_dir": ADAPTER,
        "adapter_sha256": FileHasher().tree(work_dir / ADAPTER),
        "adapter": cfg.adapter,
        "base_model": hub.base_model(cfg).lineage(),
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
    }
    log.info(
        "train: %d steps, train loss %.4f, eval loss %s", manifest["global_step"], manifest["train_loss"] or math.nan,
        f"{eval_loss:.4f}" if eval_loss is not None else "n/a",
    )
    return manifest


def sort_target_modules(adapter_dir: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes with each process's string
    hash seed: sorted, the same adapter has the same bytes (and adapter_sha256) whichever process saved it."""
    import json

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic.write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def final_evaluation(trainer: Any) -> dict[str, Any]:
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


# --- model and arguments ------------------------------------------------------------------------


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

    from tasks.tokenizer import load_tokenizer, new_token_count

    sharded = cfg.fsdp_config is not None or zero_stage(cfg) == 3
    load_options: dict[str, Any] = {
        "dtype": compute_dtype(cfg),
        "attn_implementation": choose_attn_implementation(cfg),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_4bit:
        load_options["quantization_config"] = nf4_config(compute_dtype(cfg), compute_dtype(cfg) if sharded else None)
        if torch.cuda.is_available() and not sharded:
            load_options["device_map"] = {"": device_index}
    if cfg.load_in_8bit:  # preflight refuses it without a CUDA GPU
        from transformers import BitsAndBytesConfig

        load_options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        load_options["device_map"] = {"": device_index}
    if cfg.base_model_config or cfg.overrides_of_model_config:
        from transformers import AutoConfig

        config_dir = hub.resolve(cfg.base_model_config, what="base_model_config").path if cfg.base_model_config else hub.base_model_dir(cfg)
        load_options["config"] = AutoConfig.from_pretrained(config_dir, trust_remote_code=cfg.trust_remote_code)
        # Axolotl's `model_config` / `overrides_of_model_config`, e.g. output_router_logits for MoE aux loss.
        for name, value in (cfg.overrides_of_model_config or {}).items():
            setattr(load_options["config"], name, value)
    if _stored_quantization(hub.base_model_dir(cfg)) == "mxfp4" and "quantization_config" not in load_options:
        from transformers import Mxfp4Config

        # MXFP4 weights (gpt-oss) cannot be trained through; they load dequantized to the compute dtype.
        load_options["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(hub.base_model_dir(cfg), **load_options)
    # Tokens added by `special_tokens` / `tokens` get embedding rows, trained below.
    added_tokens = new_token_count(load_tokenizer(cfg, hub.base_model_dir(cfg)), model)
    if added_tokens:
        model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + added_tokens)
    # Packed rows are only kept apart when no KV cache is in use.
    model.config.use_cache = False
    # peft's k-bit preparation casts the unquantized weights to fp32, which sharding cannot mix with
    # the stored 4-bit weights; gradient checkpointing comes from the Trainer's arguments instead.
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not sharded:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_cpu_4bit_layers_exact(model)
    if cfg.lora_model_dir:
        # Warm start: the adapter's own LoraConfig and weights, trained further.
        from peft import PeftModel

        adapter_dir = hub.resolve(cfg.lora_model_dir, what="lora_model_dir").path
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        target_parameters=cfg.lora_target_parameters,
        use_rslora=cfg.peft_use_rslora,
        modules_to_save=modules_to_save(cfg, model, added_tokens),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _stored_quantization(model_dir: Path) -> str | None:
    """The `quant_method` of the weights as stored (config.json's quantization_config), if any."""
    import json

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    stored = json.loads(config_file.read_text()).get("quantization_config") or {}
    return stored.get("quant_method")


def modules_to_save(cfg: RunConfig, model: Any, added_tokens: int) -> list[str] | None:
    """`lora_modules_to_save`, plus the embedding and output layers when tokens were added: their new
    rows start untrained and LoRA alone cannot train them (Axolotl asks users to list them)."""
    names = list(cfg.lora_modules_to_save or [])
    if added_tokens:
        layers = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
        names += [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in layers]
    return list(dict.fromkeys(names)) or None


def _optim_args_text(optim_args: str | dict[str, Any]) -> str:
    """transformers reads `optim_args` as `key=value,key=value`; Axolotl also allows a mapping."""
    if isinstance(optim_args, str):
        return optim_args
    return ",".join(f"{key}={value}" for key, value in optim_args.items())


def reporting_integrations(cfg: RunConfig) -> list[str]:
    """The Trainer's own `report_to` integrations: TensorBoard when asked and installed. MLflow and
    W&B are logged once per pipeline run by `tasks/tracking.py` (the curves from metrics.jsonl), not
    by the Trainer, which would open a second run of its own."""
    from transformers.integrations import get_available_reporting_integrations

    from tasks.tracking import TRACKERS

    available = set(get_available_reporting_integrations())
    wanted = [name for name in cfg.report_to if name not in TRACKERS]
    for name in wanted:
        if name not in available:
            log.warning("train: report_to %s skipped: it is not installed (pip install %s)", name, name)
    return [name for name in wanted if name in available]


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
        # Only what the config sets: transformers' defaults (0.9, 0.999, 1e-8) stay otherwise.
        **{name: getattr(cfg, name) for name in ("adam_beta1", "adam_beta2", "adam_epsilon") if getattr(cfg, name) is not None},
        **({"optim_args": _optim_args_text(cfg.optim_args)} if cfg.optim_args else {}),
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
        # A process that died or hung fails the others after this, not after PyTorch's 30 minutes.
        ddp_timeout=cfg.ddp_timeout,
        deepspeed=str(Path(cfg.deepspeed).resolve()) if cfg.deepspeed else None,
        **({"fsdp": True, "fsdp_config": cfg.fsdp_config.model_dump()} if cfg.fsdp_config is not None else {}),
        # transformers 5 reads a float below 1 as a fraction of the total steps.
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
    )
