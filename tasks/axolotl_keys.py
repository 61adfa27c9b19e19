"""Axolotl's config keys, read with Axolotl's meaning before the typed config is built.

loraflow promises that an Axolotl config runs as written. Every key Axolotl documents (its config
reference and `src/axolotl/utils/schemas/`) is one of:

- ours: a `RunConfig` field of the same name and meaning (nothing to do here);
- translated: rewritten into our settings (`lora_target_linear: true` -> `lora_target_modules:
  all-linear`, `saves_per_epoch` -> a fractional `save_steps`, `wandb_project` -> `report_to` and
  WANDB_PROJECT, ...), with a notice where the translation is not word for word;
- noticed: accepted with one line saying why it changes nothing here (`strict`, `debug`, ...);
- rejected: it would change what is trained and loraflow cannot honour it (`rl: dpo`, DoRA, ...);
  the problem names the key and the reason.

A key left blank (null or "") is unset, at any depth, as in Axolotl. Only keys in none of these
lists are "unknown" (real typos), and those get a did-you-mean from `tasks/config.py`.

Everything here works on the plain YAML dict: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Translation:
    """The YAML dict rewritten into loraflow's keys, with what was said about the Axolotl keys."""

    raw: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Original names of renamed nested keys (`fsdp_config.state_dict_type` -> `fsdp_config.fsdp_state_dict_type`),
    # so errors name the key the file uses.
    renamed: dict[str, str] = field(default_factory=dict)
    # Whether `bf16` was `auto` (resolved against the visible GPUs).
    precision_auto: bool = False
    # loraflow's own keys at the top level and in a dataset (given by tasks/config.py, which imports
    # this module: the schema is not imported back).
    run_fields: frozenset[str] = frozenset()
    dataset_fields: frozenset[str] = frozenset()


def is_blank(value: Any) -> bool:
    # A whitespace-only string is a value, not a blank: `fragment_str: "\n\n"` splits at paragraphs.
    return value is None or value == ""


def drop_blanks(value: Any) -> Any:
    """Blank values (null, "") removed from every mapping at any depth: blank means unset."""
    if isinstance(value, dict):
        cleaned = {key: drop_blanks(item) for key, item in value.items()}
        return {key: item for key, item in cleaned.items() if not is_blank(item)}
    if isinstance(value, list):
        return [drop_blanks(item) for item in value if not is_blank(item)]
    return value


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


@dataclass(frozen=True)
class Rule:
    """What an Axolotl-only key does here: `notice` (accepted, changes nothing) or `reject`."""

    action: str
    reason: str
    applies: Callable[[Any], bool] = _truthy


def notice(reason: str, applies: Callable[[Any], bool] = _truthy) -> Rule:
    return Rule("notice", reason, applies)


def reject(reason: str, applies: Callable[[Any], bool] = _truthy) -> Rule:
    return Rule("reject", reason, applies)


_ABOVE_ONE = lambda value: isinstance(value, (int, float)) and value > 1  # noqa: E731
_KERNEL = "it only selects a GPU kernel (same training math); loraflow picks its kernels itself"
_EXPERT_PARALLEL = "expert parallelism is not supported; MoE experts are trained where the model places them"
_RL = "it only applies with `rl`, which loraflow does not support"
_NO_EFFECT_EVAL = "loraflow scores the val split with its own token-weighted loss and eval stage"
_MEMORY = "it only saves GPU memory (same training math); the memory estimate assumes it is off"
_MULTIMODAL = "multimodal training is not supported; loraflow fine-tunes text models"

# Axolotl-only top-level keys and what loraflow does with them. Keys that are RunConfig fields or
# are translated below (TRANSLATED_KEYS) are not listed here.
TOP_LEVEL_RULES: dict[str, Rule] = {
    # housekeeping, logging and launch details
    "strict": notice("Axolotl's CLI override switch; loraflow reads the file as is"),
    "debug": notice("loraflow logs every stage; `debug` output is not used"),
    "debug_num_examples": notice("loraflow logs every stage; `debug` output is not used"),
    "local_rank": notice("set by the launcher; loraflow starts its processes itself"),
    "world_size": notice("set by the launcher; use `num_processes` (all machines together) and `num_machines`"),
    "device": notice("loraflow places the model itself (one GPU per process, or the CPU)"),
    "device_map": notice("loraflow places the model itself (one GPU per process, or the CPU)"),
    "max_memory": notice("loraflow places the model itself; `validate` estimates the memory per process"),
    "gpu_memory_limit": notice("loraflow places the model itself; `validate` estimates the memory per process"),
    "low_cpu_mem_usage": notice("transformers loads weights lazily already"),
    "ddp": notice("DDP is chosen from the process count"),
    "ddp_bucket_cap_mb": notice("a DDP speed setting; the default is used"),
    "ddp_broadcast_buffers": notice("LoRA training has no buffers to broadcast"),
    "ddp_find_unused_parameters": notice("every LoRA weight gets a gradient, so loraflow switches the search off"),
    "accelerator_config": notice("loraflow configures accelerate itself"),
    "remove_unused_columns": notice("prep writes only the columns training reads"),
    "dataloader_pin_memory": notice("a loading speed setting; the default is used"),
    "dataloader_num_workers": notice("packed rows are read from memory-mapped shards; no workers needed"),
    "dataloader_prefetch_factor": notice("a loading speed setting; the default is used"),
    "dataloader_drop_last": reject("dropping the last partial batch changes what is trained", ),
    "torchdistx_path": notice("only for `adamw_anyprecision`, which loraflow does not offer"),
    "include_tokens_per_second": notice("loraflow records tokens seen in every run"),
    "profiler_steps": notice("the PyTorch profiler is not wired in"),
    "loss_watchdog_threshold": notice("no loss watchdog; the loss curve is in the train artifacts"),
    "loss_watchdog_patience": notice("no loss watchdog; the loss curve is in the train artifacts"),
    "gc_steps": notice("a memory housekeeping setting; not needed here"),
    "is_falcon_derived_model": notice("the architecture is read from config.json"),
    "is_llama_derived_model": notice("the architecture is read from config.json"),
    "is_mistral_derived_model": notice("the architecture is read from config.json"),
    "is_qwen_derived_model": notice("the architecture is read from config.json"),
    "is_preprocess": notice("internal to Axolotl"),
    "preprocess_iterable": notice("internal to Axolotl"),
    "axolotl_config_path": notice("internal to Axolotl"),
    "total_num_tokens": notice("packing statistics are computed by prep"),
    "total_supervised_tokens": notice("packing statistics are computed by prep"),
    "sample_packing_eff_est": notice("packing statistics are computed by prep"),
    "sample_packing_group_size": notice("prep packs the whole dataset best-fit, not in groups"),
    "sample_packing_bin_size": notice("prep packs the whole dataset best-fit, not in bins of fixed count"),
    "sample_packing_sequentially": notice("prep packs the whole dataset best-fit"),
    "multipack_real_batches": notice("prep packs into rows of sequence_len; batches are micro_batch_size rows"),
    "batch_flattening": notice("packed rows already carry per-sample position_ids"),
    "pretrain_multipack_buffer_size": notice("only for `pretraining_dataset`"),
    "pretrain_multipack_attn": notice("packed samples never attend to each other here"),
    "pretraining_sample_concatenation": notice("only for `pretraining_dataset`"),
    "skip_prepare_dataset": notice("prep is cached on content; an unchanged dataset is not prepared again"),
    "dataset_keep_in_memory": notice("prep streams rows into Arrow shards"),
    "push_dataset_to_hub": notice("prep outputs stay in state_dir"),
    "hf_use_auth_token": notice("the hub token comes from HF_TOKEN"),
    "shuffle_merged_datasets": reject("keeping datasets in file order changes the training order; loraflow shuffles",
                                      applies=lambda value: value is False),
    "dataset_shard_num": reject("training on a shard of the data is not supported; cut the file instead"),
    "dataset_shard_idx": reject("training on a shard of the data is not supported; cut the file instead"),
    "hub_strategy": notice("export pushes the final model to `hub_model_id`; checkpoints are not pushed"),
    "hub_revision": notice("export pushes to the hub repo's main branch"),
    "save_safetensors": notice("loraflow always writes safetensors"),
    "save_only_model": notice("loraflow keeps optimizer state in checkpoints so a resumed run is exact"),
    "save_first_step": notice("checkpoints are written every `save_steps`"),
    "tokenizer_use_fast": notice("loraflow always uses the fast (Rust) tokenizer; prep needs its offsets"),
    "tokenizer_legacy": notice("the tokenizer's own setting is used"),
    "tokenizer_save_jinja_files": notice("the chat template is saved with the adapter's tokenizer"),
    "processor_type": reject(_MULTIMODAL),
    "cls_model_config": notice("the config class is read from config.json"),
    "base_model_ignore_patterns": notice("weights are read from the model directory's safetensors"),
    "experimental_skip_move_to_device": notice("loraflow places the model itself"),
    "use_kernels": notice(_KERNEL),
    "lora_on_cpu": notice("loraflow places the adapter with the model; export merges on the CPU"),
    "qlora_sharded_model_loading": notice("under FSDP, QLoRA weights are stored in the compute dtype and sharded"),
    "merge_lora": notice("export merges the adapter after every run (or `export.adapter_only`)"),
    "merge_method": notice("export merges shard by shard and checks the merged logits"),
    "resize_token_embeddings_to_32x": notice("padding rows of the embedding are never used by the tokenizer"),
    "shrink_embeddings": notice("embeddings are only grown, for added tokens"),
    "embeddings_skip_upcast": notice("embeddings stay in the compute dtype"),
    "mean_resizing_embeddings": reject("new token embeddings are initialised by transformers' default, not the mean",
                                       applies=lambda value: value is True),
    "flash_attn_cross_entropy": notice(_KERNEL),
    "flash_attn_rms_norm": notice(_KERNEL),
    "flash_attn_fuse_qkv": notice(_KERNEL),
    "flash_attn_fuse_mlp": notice(_KERNEL),
    "flash_optimum": notice(_KERNEL),
    "xformers_attention": notice("attention is flash-attn, flex or SDPA here (same math as xformers)"),
    "unsloth_cross_entropy_loss": notice(_KERNEL),
    "unsloth_lora_mlp": notice(_KERNEL),
    "unsloth_lora_qkv": notice(_KERNEL),
    "unsloth_lora_o": notice(_KERNEL),
    "unsloth_rms_norm": notice(_KERNEL),
    "unsloth_rope": notice(_KERNEL),
    "lora_mlp_kernel": notice(_KERNEL),
    "lora_qkv_kernel": notice(_KERNEL),
    "lora_o_kernel": notice(_KERNEL),
    "cut_cross_entropy": notice("a memory-saving loss kernel (same loss); `liger_kernel: true` fuses the loss here"),
    "torch_compile_backend": notice("torch.compile uses its default backend"),
    "torch_compile_mode": notice("torch.compile uses its default mode"),
    "flex_attn_compile_kwargs": notice("flex attention is compiled with its defaults"),
    "use_scattermoe": notice(_KERNEL),
    "use_sonicmoe": notice(_KERNEL),
    "experts_implementation": notice(_KERNEL),
    "fused_attn_kernel": notice(_KERNEL),
    "gemma4_hybrid_attn_impl": notice(_KERNEL),
    "dsv4_fp4_grouped_mode": notice(_KERNEL),
    "use_dsv4_kernels": notice(_KERNEL),
    "use_glm_dsa_kernels": notice(_KERNEL),
    "lora_embedding_kernel": notice(_KERNEL),
    "quantize_moe_experts": notice(_MEMORY + " (MoE expert weights load as transformers stores them, not quantized)"),
    "llama4_linearized_experts": notice(_MEMORY + " (Llama 4 experts load as transformers stores them, not split into "
                                        "quantizable linear layers)"),
    "activation_offloading": notice(_MEMORY + " (activations stay on the GPU; `gradient_checkpointing` recomputes them)"),
    "ple_cpu_offload": notice(_MEMORY + " (the per-layer embedding table stays where transformers places it)"),
    "tokenizer_use_mistral_common": notice("loraflow uses the model's Hugging Face tokenizer (tokenizer.json) and its chat "
                                           "template, which Mistral publishes to match mistral-common's"),
    "lora_fan_in_fan_out": notice("peft sets fan-in/fan-out from the layer type (Conv1D or Linear) itself"),
    "gptq_disable_exllama": notice("only for `gptq`, which loraflow does not train on"),
    "use_otel_metrics": notice("OpenTelemetry metrics are not wired in; loraflow records metrics in the train artifacts"),
    "otel_metrics_host": notice("OpenTelemetry metrics are not wired in; loraflow records metrics in the train artifacts"),
    "otel_metrics_port": notice("OpenTelemetry metrics are not wired in; loraflow records metrics in the train artifacts"),
    "s2_attention": reject("shifted-sparse attention changes what the model attends to and is not supported"),
    "fsdp_final_state_dict_type": notice("the adapter is always saved as a full state dict"),
    # evaluation extras
    "eval_batch_size": notice(_NO_EFFECT_EVAL + " (the batch size does not change it)"),
    "eval_table_size": notice(_NO_EFFECT_EVAL),
    "eval_max_new_tokens": notice("eval's completion length is `eval.max_tokens`"),
    "eval_table_max_new_tokens": notice("eval's completion length is `eval.max_tokens`"),
    "do_causal_lm_eval": notice(_NO_EFFECT_EVAL),
    "eval_causal_lm_metrics": notice(_NO_EFFECT_EVAL),
    "do_bench_eval": notice(_NO_EFFECT_EVAL),
    "bench_dataset": notice(_NO_EFFECT_EVAL),
    "bench_split": notice(_NO_EFFECT_EVAL),
    "metric_for_best_model": notice("the promotion gate (`export.promote_if`) chooses between versions"),
    "greater_is_better": notice("the promotion gate (`export.promote_if`) chooses between versions"),
    "generate_samples": notice(_NO_EFFECT_EVAL),
    "num_generation_samples": notice(_NO_EFFECT_EVAL),
    "generation_max_new_tokens": notice("eval's completion length is `eval.max_tokens`"),
    "load_best_model_at_end": reject("loraflow exports the last step's adapter, not the best checkpoint"),
    "early_stopping_patience": reject("early stopping changes how long training runs; set max_steps or num_epochs"),
    "test_datasets": reject("a separate test set is not supported; eval uses the val split (`val_set_size`)"),
    # reporting integrations loraflow does not wire
    "use_comet": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_api_key": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_workspace": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_project_name": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_experiment_key": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_mode": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_online": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    "comet_experiment_config": notice("Comet is not wired in; use report_to: [wandb] or [mlflow]"),
    **{key: notice("SwanLab is not wired in; use report_to: [wandb] or [mlflow]") for key in (
        "use_swanlab", "swanlab_project", "swanlab_experiment_name", "swanlab_description", "swanlab_mode",
        "swanlab_log_completions", "swanlab_workspace", "swanlab_api_key", "swanlab_web_host", "swanlab_api_host",
        "swanlab_lark_webhook_url", "swanlab_lark_secret", "swanlab_log_model", "swanlab_completion_log_interval",
        "swanlab_completion_max_buffer")},
    "gradio_title": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    "gradio_share": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    "gradio_server_name": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    "gradio_server_port": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    "gradio_max_new_tokens": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    "gradio_temperature": notice("no Gradio UI; eval serves the model with `transformers serve`"),
    # preference and reward training
    "rl": reject("preference tuning (`rl`) is not supported; loraflow does supervised fine-tuning"),
    "reward_model": reject("reward modelling is not supported; loraflow does supervised fine-tuning"),
    "process_reward_model": reject("reward modelling is not supported; loraflow does supervised fine-tuning"),
    "num_labels": reject("classification heads are not supported; loraflow trains causal LMs"),
    "trl": notice(_RL),
    "vllm": notice("vLLM serves eval with `eval.endpoint: vllm`; this section is for `rl`"),
    "rl_beta": notice(_RL),
    "dpo_beta": notice(_RL),
    "dpo_use_weighting": notice(_RL),
    "dpo_use_logits_to_keep": notice(_RL),
    "dpo_generate_during_eval": notice(_RL),
    "dpo_norm_loss": notice(_RL),
    "rpo_alpha": notice(_RL),
    "orpo_alpha": notice(_RL),
    "cpo_alpha": notice(_RL),
    "simpo_gamma": notice(_RL),
    "kto_desirable_weight": notice(_RL),
    "kto_undesirable_weight": notice(_RL),
    "max_prompt_len": notice(_RL),
    # training changes loraflow cannot honour
    "pretraining_dataset": reject("streamed pretraining datasets are not supported; use `datasets` with `type: completion`"),
    "curriculum_sampling": reject("curriculum (unshuffled) sampling is not supported"),
    "min_sample_len": reject("dropping short samples is not supported; filter the data with a contract"),
    "use_pose": reject("PoSE context extension is not supported"),
    "pose_split_on_token_ids": reject("PoSE context extension is not supported"),
    "pose_max_context_len": reject("PoSE context extension is not supported"),
    "pose_num_chunks": reject("PoSE context extension is not supported"),
    "unfrozen_parameters": reject("training base weights besides LoRA is not supported; use lora_modules_to_save"),
    "neftune_noise_alpha": reject("NEFTune embedding noise is not supported"),
    "noisy_embedding_alpha": reject("NEFTune embedding noise is not supported"),
    "relora": reject("ReLoRA restarts are not supported"),
    "relora_steps": reject("ReLoRA restarts are not supported"),
    "relora_warmup_steps": reject("ReLoRA restarts are not supported"),
    "relora_anneal_steps": reject("ReLoRA restarts are not supported"),
    "relora_prune_ratio": reject("ReLoRA restarts are not supported"),
    "relora_prune_method": notice("only for ReLoRA, which is not used"),
    "relora_cpu_offload": reject("ReLoRA restarts are not supported"),
    "jagged_restart_steps": reject("ReLoRA restarts are not supported"),
    "jagged_restart_warmup_steps": reject("ReLoRA restarts are not supported"),
    "jagged_restart_anneal_steps": reject("ReLoRA restarts are not supported"),
    "lisa_n_layers": reject("LISA layer sampling is not supported"),
    "lisa_step_interval": reject("LISA layer sampling is not supported"),
    "lisa_layers_attribute": notice("only for LISA, which is not used"),
    "loraplus_lr_ratio": reject("LoRA+ learning rates are not supported"),
    "loraplus_lr_embedding": notice("only for LoRA+, which is not used"),
    "peft_layers_to_transform": reject("LoRA on a subset of layers is not supported; all layers are adapted"),
    "peft_layers_pattern": reject("LoRA on a subset of layers is not supported; all layers are adapted"),
    "peft_use_dora": reject("DoRA is not supported; loraflow trains LoRA"),
    "peft_layer_replication": reject("LoRA layer replication is not supported"),
    "peft_init_lora_weights": reject("LoRA initialisations other than the default are not supported",
                                     applies=lambda value: value is not True),
    "peft_trainable_token_indices": reject("training single token rows is not supported; use lora_modules_to_save"),
    "peft_ensure_weight_tying": notice("tied weights stay tied as transformers loads them"),
    "peft_autocast_adapter_dtype": notice("peft's default (fp32 adapter weights) is used"),
    "peft": reject("`peft` (LoftQ, torchao quantization) is not supported; use `adapter: qlora` for nf4"),
    "gptq": reject("training on GPTQ-quantized models is not supported; use the unquantized model with `adapter: qlora`"),
    "bnb_config_kwargs": reject("loraflow's QLoRA is nf4 with double quantization; other bitsandbytes settings are not supported",
                                applies=lambda value: isinstance(value, dict) and any(
                                    (key, item) not in {("bnb_4bit_quant_type", "nf4"), ("bnb_4bit_use_double_quant", True),
                                                        ("llm_int8_has_fp16_weight", False)}
                                    for key, item in value.items())),
    "qat": reject("quantization-aware training is not supported"),
    "quantization": reject("Axolotl's quantization section is not supported; export writes GPTQ / AWQ / nf4 / GGUF with `export.quantize`"),
    "fp8": reject("fp8 training is not supported; use bf16"),
    "fix_untrained_tokens": reject("re-initialising untrained token embeddings is not supported"),
    "added_tokens_overrides": reject("overriding reserved tokens is not supported; add tokens with `tokens`"),
    "eot_tokens": notice("each trained turn is trained through the end-of-turn text its chat template writes, so "
                         "these tokens are trained as with Axolotl's `train_on_eot: turn`"),
    "default_system_message": reject("a default system message is not supported; put the system turn in the data"),
    "overrides_of_model_kwargs": reject("extra model loading arguments are not supported"),
    "model_kwargs": reject("extra model loading arguments are not supported"),
    "rope_scaling": reject("RoPE scaling is not supported"),
    "max_packed_sequence_len": reject("removed in Axolotl; use sequence_len with sample_packing"),
    "random_init_weights": reject("training from random weights is not supported; loraflow fine-tunes"),
    "lr_quadratic_warmup": reject("quadratic warmup is not supported; warmup is linear"),
    "lr_scheduler_kwargs": reject("scheduler arguments are not supported; the scheduler's defaults are used"),
    "cosine_min_lr_ratio": reject("a cosine floor is not supported; cosine decays to 0"),
    "cosine_constant_lr_ratio": reject("a constant-then-cosine schedule is not supported"),
    "lr_div_factor": notice("only for `lr_scheduler: one_cycle`, which is not supported"),
    "lr_groups": reject("per-module learning rates are not supported"),
    "embedding_lr": reject("a separate embedding learning rate is not supported"),
    "embedding_lr_scale": reject("a separate embedding learning rate is not supported"),
    "optim_target_modules": reject("GaLore/APOLLO target modules are not supported"),
    "adam_beta3": reject("CAME optimizer settings are not supported"),
    "adam_epsilon2": reject("CAME optimizer settings are not supported"),
    "auto_find_batch_size": reject("automatic batch size search changes the batch; set micro_batch_size"),
    "sequence_parallel_degree": reject("sequence parallelism is not supported", applies=_ABOVE_ONE),
    "context_parallel_size": reject("context parallelism is not supported", applies=_ABOVE_ONE),
    "tensor_parallel_size": reject("tensor parallelism is not supported", applies=_ABOVE_ONE),
    "dp_shard_size": notice("FSDP shards over all processes"),
    "dp_replicate_size": notice("FSDP shards over all processes"),
    "expert_parallel_size": reject(_EXPERT_PARALLEL, applies=_ABOVE_ONE),
    "expert_parallel_num_nvl_bytes": reject(_EXPERT_PARALLEL),
    "expert_parallel_token_capacity": reject(_EXPERT_PARALLEL),
    "nvfp4_merge_aware": reject("merge-aware NVFP4 training (LoRA trained against fake-quantized weights) is not supported"),
    "heads_k_stride": notice("only for sequence parallelism, which is not used"),
    "ring_attn_func": notice("only for sequence parallelism, which is not used"),
    # multimodal
    "image_size": reject(_MULTIMODAL),
    "image_resize_algorithm": reject(_MULTIMODAL),
    "skip_prepare_dataset_images": reject(_MULTIMODAL),
}

# Keys inside one `datasets` entry that Axolotl documents and loraflow does not have as a field.
DATASET_RULES: dict[str, Rule] = {
    "shards": reject("training on a shard of the data is not supported; cut the file instead"),
    "shards_idx": reject("training on a shard of the data is not supported; cut the file instead"),
    "preprocess_shards": notice("prep streams rows; no sharded preprocessing needed"),
    "conversation": notice("fastchat conversation names are not used; rows are rendered with the chat template"),
    "input_transform": reject("row transform functions are not supported"),
    "input_format": reject("custom input formats are not supported"),
    "field_human": reject("custom ShareGPT fields are not supported; use message_property_mappings"),
    "field_model": reject("custom ShareGPT fields are not supported; use message_property_mappings"),
    "field_tools": reject("tool definitions in the chat template are not supported"),
    "split_thinking": reject("splitting reasoning traces is not supported"),
    "message_field_training": reject("per-turn training flags are not supported; use roles_to_train"),
    "message_field_training_detail": reject("per-token training spans are not supported; use roles_to_train"),
    "train_on_eot": notice("the end-of-turn token is the eos token here; `train_on_eos` decides"),
    "logprobs_field": reject("distillation from logprobs is not supported"),
    "temperature": reject("distillation from logprobs is not supported"),
    "trust_remote_code": notice("local data files run no code"),
    "revision": notice("only for hub datasets; local files have no revision"),
    "system_prompt": reject("custom prompt formats are not supported; use type: alpaca or chat_template"),
    "system_format": reject("custom prompt formats are not supported; use type: alpaca or chat_template"),
    "format": reject("custom prompt formats are not supported; use type: alpaca or chat_template"),
    "no_input_format": reject("custom prompt formats are not supported; use type: alpaca or chat_template"),
    "step_separator": reject("stepwise supervised datasets are not supported"),
    "train_on_last_step_only": reject("stepwise supervised datasets are not supported"),
    "max_completion_length": reject("stepwise supervised datasets are not supported"),
    "text_column": notice("use `field` for the text column of a completion dataset"),
    "skip": reject("skipping rows is not supported; cut the file instead"),
}

# FSDP1 options (Axolotl's `fsdp_config`) that FSDP2 has no switch for, or that change only how
# checkpoints are stored. Named with their `fsdp_` prefix, as the files write them.
FSDP_RULES: dict[str, Rule] = {
    "limit_all_gathers": notice("FSDP2 limits all-gathers itself", applies=lambda value: True),
    "use_orig_params": notice("FSDP2 always keeps the original parameters", applies=lambda value: True),
    "sync_module_states": notice("loaded weights are broadcast with cpu_ram_efficient_loading", applies=lambda value: True),
    "backward_prefetch": notice("FSDP2 prefetches itself", applies=lambda value: True),
    "forward_prefetch": notice("FSDP2 prefetches itself", applies=lambda value: True),
    "state_dict_type": notice("checkpoints and the adapter use full state dicts (LoRA weights are small)",
                              applies=lambda value: value != "FULL_STATE_DICT"),
    "version": notice("loraflow uses FSDP2 (transformers deprecates FSDP1); the same sharding", applies=lambda value: value != 2),
    "activation_checkpointing_policy": notice("FSDP's activation checkpointing wraps each decoder layer"),
    "mixed_precision_policy": notice("mixed precision follows `bf16`"),
    "final_state_dict_type": notice("the adapter is always saved as a full state dict"),
    "use_cpu_ram_efficient_loading": notice("the name without `use_` is read", applies=lambda value: False),
}

# Named chat templates loraflow carries (tasks/tokenizer.py).
CHAT_TEMPLATE_NAMES = ("tokenizer_default", "jinja", "chatml", "qwen_25", "llama3", "gemma", "gemma3", "phi_3", "mistral_v1")
# Axolotl's names (its ChatTemplate enum) for a model family's own format: the model's tokenizer ships
# that template, so these read as `tokenizer_default`, with a notice.
MODEL_FAMILY_TEMPLATES = (
    "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "cohere", "llama4", "phi_35", "phi_4", "deepseek_v2",
    "deepseek_v3", "jamba", "qwen3", "qwen3_5", "falcon_h1", "nemotron_h", "exaone", "exaone4", "gemma3n", "gemma4",
    "gemma4_unified", "command_a", "command_a_tool_use", "command_a_rag", "aya",
)
# Axolotl's template names loraflow does not carry (its ChatTemplate enum), so they are refused
# with a reason rather than called unknown.
AXOLOTL_ONLY_TEMPLATES = ("alpaca", "metharme", "llama3_2_vision", "qwen2_vl", "pixtral", "llava")

# transformers' optimizer names (`TrainingArguments.optim`) that train without extra arguments.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "ademamix",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "adamw_torch_4bit", "adamw_torch_8bit",
)
# bitsandbytes (CUDA) and torchao (CUDA) optimizers: they need a GPU.
GPU_ONLY_OPTIMIZERS = tuple(
    name for name in OPTIMIZERS
    if "bnb" in name or "8bit" in name or "paged" in name or "lion" in name or name.startswith("adamw_torch_4")
)
# Axolotl's own optimizer names: a translation where one exists, else the reason.
OPTIMIZER_ALIASES = {"ao_adamw_8bit": "adamw_torch_8bit", "ao_adamw_4bit": "adamw_torch_4bit"}
UNSUPPORTED_OPTIMIZERS = {
    "optimi_adamw": "Axolotl's optimi AdamW", "ao_adamw_fp8": "torchao's fp8 AdamW", "adopt_adamw": "ADOPT",
    "came_pytorch": "CAME", "muon": "Muon", "dion": "Dion", "adamw_torch_xla": "the XLA AdamW (TPUs)",
    "adamw_torch_npu_fused": "the NPU AdamW", "adamw_apex_fused": "apex's AdamW", "adamw_anyprecision": "torchdistx's AdamW",
    "galore_adamw": "GaLore", "galore_adamw_8bit": "GaLore", "galore_adafactor": "GaLore",
    "galore_adamw_layerwise": "GaLore", "galore_adamw_8bit_layerwise": "GaLore", "galore_adafactor_layerwise": "GaLore",
    "lomo": "LOMO", "adalomo": "AdaLomo", "grokadamw": "GrokAdamW", "schedule_free_adamw": "schedule-free AdamW",
    "schedule_free_sgd": "schedule-free SGD", "schedule_free_radam": "schedule-free RAdam",
    "apollo_adamw": "APOLLO", "apollo_adamw_layerwise": "APOLLO", "stable_adamw": "StableAdamW",
}

# Plugins that only select kernels: they map to `liger_kernel` or change nothing trained.
KERNEL_PLUGINS = {
    "axolotl.integrations.liger.LigerPlugin": "liger",
    "axolotl.integrations.liger.plugin.LigerPlugin": "liger",
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": "cut_cross_entropy",
    "axolotl.integrations.kernels.KernelsPlugin": "kernels",
    "axolotl.integrations.swanlab.SwanLabPlugin": "swanlab",
}
# Plugins that change how training runs, refused with the reason.
REFUSED_PLUGINS = {"axolotl.integrations.expert_parallel.ExpertParallelPlugin": _EXPERT_PARALLEL}
LIGER_KEYS = (
    "liger_rope", "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu",
    "liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_use_token_scaling", "liger_rms_norm_gated",
)

# Keys consumed by the translations below (documented by Axolotl, not RunConfig fields).
TRANSLATED_KEYS = (
    "fp16", "bfloat16", "float16", "float32", "torch_dtype", "lora_target_linear", "saves_per_epoch",
    "evals_per_epoch", "save_strategy", "eval_strategy", "evaluation_strategy", "gradient_checkpointing_kwargs",
    "use_wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_mode", "wandb_watch",
    "wandb_log_model", "use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name",
    "hf_mlflow_log_artifacts", "use_tensorboard", "plugins", *LIGER_KEYS, "sdp_attention", "flex_attention",
    "eager_attention", "model_type", "type_of_model", "tokenizer_type", "dataset_prepared_path",
    "resume_from_checkpoint", "auto_resume_from_checkpoints", "pad_to_sequence_len", "eval_sample_packing",
    "group_by_length", "model_revision", "use_ray", "ray_num_workers", "resources_per_worker", "ray_run_name",
)
DATASET_TRANSLATED_KEYS = (
    "message_field_role", "message_field_content", "name", "data_files", "chat_template", "chat_template_jinja", "roles",
)


def documented_keys() -> set[str]:
    """Every top-level Axolotl key loraflow knows without being a RunConfig field."""
    return set(TOP_LEVEL_RULES) | set(TRANSLATED_KEYS)


def translate(
    raw: dict[str, Any], gpu_capabilities: Callable[[], list[float]], run_fields: frozenset[str], dataset_fields: frozenset[str]
) -> Translation:
    """Rewrites Axolotl's keys into loraflow's. `gpu_capabilities` lists the compute capability of
    each visible GPU (asked only when a setting is `auto`); `run_fields` and `dataset_fields` are
    loraflow's own keys, which are never Axolotl-only."""
    full_fine_tune = "adapter" in raw and is_blank(raw["adapter"])
    result = Translation(drop_blanks(raw), run_fields=run_fields, dataset_fields=dataset_fields)
    if full_fine_tune:
        result.problems.append(
            "`adapter` is blank, which in Axolotl means full fine-tuning: not supported, loraflow trains "
            "LoRA adapters; set `adapter: lora` (or qlora)"
        )
    for step in (_precision, _lora_targets, _checkpoint_and_eval_schedule, _optimizer, _gradient_checkpointing,
                 _reporting, _kernels, _attention, _model_classes, _pipeline_notices, _datasets, _chat_template_name,
                 _batch_and_warmup, _model_loading, _fsdp, _ray, _rules):
        step(result, gpu_capabilities)
    result.problems = _one_problem_per_reason(result.problems)
    return result


_REFUSAL = " is a known Axolotl setting but "


def _one_problem_per_reason(problems: list[str]) -> list[str]:
    """Keys refused for the same reason (ReLoRA's five keys, expert parallelism's plugin and sizes) make
    one problem naming them all: one feature, one line."""
    keys_by_reason: dict[str, list[str]] = {}
    merged: list[str] = []
    for problem in problems:
        key, separator, reason = problem.partition(_REFUSAL)
        if not separator:
            merged.append(problem)
        elif reason in keys_by_reason:
            keys_by_reason[reason].append(key)
        else:
            keys_by_reason[reason] = [key]
            merged.append(reason)  # a placeholder, filled in below
    return [
        (f"{', '.join(keys_by_reason[item])} are known Axolotl settings but {item}" if len(keys_by_reason[item]) > 1
         else f"{keys_by_reason[item][0]}{_REFUSAL}{item}") if item in keys_by_reason else item
        for item in merged
    ]


def _say(result: Translation, key: str, message: str) -> None:
    result.notes.append(f"`{key}`: {message}")


def _refuse(result: Translation, key: str, message: str) -> None:
    result.problems.append(f"`{key}` is a known Axolotl setting but {message}")


def _precision(result: Translation, gpu_capabilities: Callable[[], list[float]]) -> None:
    """bf16/fp16/tf32 `auto` resolve against the visible GPUs (bf16 and tf32 need compute capability 8.0+)."""
    raw = result.raw
    ampere = None

    def has_ampere() -> bool:
        nonlocal ampere
        if ampere is None:
            ampere = any(capability >= 8.0 for capability in gpu_capabilities())
        return ampere

    torch_dtype = raw.pop("torch_dtype", None)
    if torch_dtype is not None and "bf16" not in raw:
        dtype = str(torch_dtype).removeprefix("torch.")
        if dtype in ("bfloat16", "bf16"):
            raw["bf16"] = True
            _say(result, "torch_dtype", "bfloat16 -> `bf16: true` (weights load and train in bf16)")
        elif dtype in ("float32", "fp32"):
            raw["bf16"] = False
        elif dtype == "auto":
            raw["bf16"] = "auto"
        else:
            _refuse(result, "torch_dtype", f"{torch_dtype} training is not supported; loraflow trains in bf16 or fp32")
    elif torch_dtype is not None:
        _say(result, "torch_dtype", "`bf16` decides the dtype here")
    for name, meaning in (("bfloat16", True), ("float32", False)):
        value = raw.pop(name, None)
        if value is True and "bf16" not in raw:
            raw["bf16"] = meaning
            _say(result, name, f"-> `bf16: {str(meaning).lower()}`")
    if raw.pop("float16", None) is True:
        _refuse(result, "float16", "fp16 weights are not supported; loraflow trains in bf16 or fp32")
    if raw.get("bf16") == "full":
        raw["bf16"] = True
        _say(result, "bf16", "full -> true (eval scores in the serving dtype anyway)")
    if raw.get("bf16") == "auto":
        result.precision_auto = True
        raw["bf16"] = has_ampere()
        _say(result, "bf16", f"auto -> {str(raw['bf16']).lower()} ("
             + ("a GPU with bf16 is visible)" if raw["bf16"] else "no GPU with bf16 here; fp32, and true on an Ampere+ GPU)"))
    fp16 = raw.pop("fp16", None)
    if fp16 is True and raw.get("bf16") is True:
        _say(result, "fp16", "true alongside `bf16: true`: bf16 is used")
    elif fp16 is True:
        raw["bf16"] = True
        _say(result, "fp16", "true -> `bf16: true` (the same half-precision mixed-precision training, with bf16's range "
             "instead of fp16 loss scaling; needs an Ampere+ GPU)")
    elif fp16 == "auto":
        _say(result, "fp16", "auto -> false (loraflow trains in bf16 where the GPU has it, else fp32)")
    if raw.get("tf32") == "auto":
        raw["tf32"] = has_ampere()
        _say(result, "tf32", f"auto -> {str(raw['tf32']).lower()}")


def _lora_targets(result: Translation, _: Any) -> None:
    raw = result.raw
    if raw.pop("lora_target_linear", None) is True:
        if raw.get("lora_target_modules") not in (None, "all-linear"):
            _say(result, "lora_target_linear", "true targets every linear layer, a superset of `lora_target_modules`")
        raw["lora_target_modules"] = "all-linear"


def _checkpoint_and_eval_schedule(result: Translation, _: Any) -> None:
    """`saves_per_epoch: N` is a save every 1/N of an epoch: as in Axolotl, a fraction of the planned
    training steps (transformers reads a `save_steps` below 1 as one)."""
    raw = result.raw
    epochs = raw.get("num_epochs", 1)
    for per_epoch_key, steps_key, strategy_keys in (
        ("saves_per_epoch", "save_steps", ("save_strategy",)),
        ("evals_per_epoch", "eval_steps", ("eval_strategy", "evaluation_strategy")),
    ):
        strategy = next((raw.pop(key) for key in strategy_keys if key in raw), None)
        for key in strategy_keys:
            raw.pop(key, None)
        per_epoch = raw.pop(per_epoch_key, None)
        if per_epoch == 0:
            per_epoch = None
            _say(result, per_epoch_key, "0 -> unset" + (" (no evaluation during training)" if steps_key == "eval_steps"
                                                         else " (no checkpoints unless `save_steps` is set)"))
        if strategy == "epoch" and per_epoch is None and steps_key not in raw:
            per_epoch = 1
        if per_epoch is not None:
            if steps_key in raw:
                result.problems.append(f"`{per_epoch_key}` and `{steps_key}` both set when to act; keep one of them")
                continue
            if not isinstance(per_epoch, int) or isinstance(per_epoch, bool) or per_epoch < 1:
                result.problems.append(f"`{per_epoch_key}` must be a whole number >= 1 (got {per_epoch!r})")
                continue
            fraction = 1.0 / (per_epoch * float(epochs) if isinstance(epochs, (int, float)) and epochs > 0 else per_epoch)
            raw[steps_key] = fraction if fraction < 1 else 1
        elif strategy == "no":
            raw.pop(steps_key, None)
            if steps_key == "save_steps":
                _say(result, "save_strategy", "no -> no checkpoints (a killed run starts over)")
        elif strategy == "best":
            result.problems.append(f"`{strategy_keys[0]}: best` is a known Axolotl setting but keeping the best "
                                   "checkpoint is not supported; loraflow exports the last step")


def _optimizer(result: Translation, _: Any) -> None:
    raw = result.raw
    name = raw.get("optimizer")
    if not isinstance(name, str):
        return
    if name in OPTIMIZER_ALIASES:
        raw["optimizer"] = OPTIMIZER_ALIASES[name]
        _say(result, "optimizer", f"{name} -> {raw['optimizer']} (the same torchao optimizer through transformers)")
    elif name in UNSUPPORTED_OPTIMIZERS:
        raw.pop("optimizer")
        _refuse(result, "optimizer", f"{name} ({UNSUPPORTED_OPTIMIZERS[name]}) is not supported; use adamw_torch, "
                "adamw_torch_fused or, on a GPU, adamw_bnb_8bit / paged_adamw_8bit")


def _gradient_checkpointing(result: Translation, _: Any) -> None:
    raw = result.raw
    if raw.get("gradient_checkpointing") in ("offload", "offload_disk"):
        value = raw["gradient_checkpointing"]
        raw["gradient_checkpointing"] = True
        _say(result, "gradient_checkpointing", f"{value} -> true: activations are recomputed on the GPU instead of "
             "offloaded (the same gradients; more GPU memory)")
    kwargs = raw.pop("gradient_checkpointing_kwargs", None)
    if isinstance(kwargs, dict) and kwargs:
        if kwargs.get("use_reentrant") is True or set(kwargs) - {"use_reentrant"}:
            _say(result, "gradient_checkpointing_kwargs", "loraflow always checkpoints non-reentrantly "
                 "(the same gradients; the mode PyTorch recommends)")


def _reporting(result: Translation, _: Any) -> None:
    """W&B and MLflow settings become `report_to` plus the environment variables the libraries read."""
    raw = result.raw
    report_to = raw.get("report_to")
    targets = [report_to] if isinstance(report_to, str) and report_to != "none" else list(report_to or [])
    environment = dict(raw.get("tracking_env") or {})
    wandb_env = {"wandb_project": "WANDB_PROJECT", "wandb_entity": "WANDB_ENTITY", "wandb_name": "WANDB_NAME",
                 "wandb_run_id": "WANDB_RUN_ID", "wandb_mode": "WANDB_MODE", "wandb_log_model": "WANDB_LOG_MODEL",
                 "wandb_watch": "WANDB_WATCH"}
    wandb_settings = {key: raw.pop(key) for key in list(wandb_env) if key in raw}
    use_wandb = raw.pop("use_wandb", None)
    wandb_on = (use_wandb is True or "wandb_project" in wandb_settings or "wandb" in targets) and use_wandb is not False \
        and wandb_settings.get("wandb_mode") != "disabled"
    if wandb_on:
        environment.update({wandb_env[key]: str(value) for key, value in wandb_settings.items()})
        targets.append("wandb")
    elif wandb_settings:
        _say(result, next(iter(wandb_settings)), "W&B is off (no `wandb_project`), so the wandb_* settings change nothing")
    mlflow_env = {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "mlflow_experiment_name": "MLFLOW_EXPERIMENT_NAME",
                  "mlflow_run_name": "MLFLOW_RUN_NAME", "hf_mlflow_log_artifacts": "HF_MLFLOW_LOG_ARTIFACTS"}
    mlflow_settings = {key: raw.pop(key) for key in list(mlflow_env) if key in raw}
    use_mlflow = raw.pop("use_mlflow", None)
    if (use_mlflow is True or "mlflow_tracking_uri" in mlflow_settings or "mlflow" in targets) and use_mlflow is not False:
        environment.update({mlflow_env[key]: str(value) for key, value in mlflow_settings.items()})
        targets.append("mlflow")
    elif mlflow_settings:
        _say(result, next(iter(mlflow_settings)), "MLflow is off (no `mlflow_tracking_uri`), so the mlflow_* settings change nothing")
    if raw.pop("use_tensorboard", None) is True:
        targets.append("tensorboard")
    if targets or "report_to" in raw:
        raw["report_to"] = list(dict.fromkeys(targets))
    if environment:
        raw["tracking_env"] = environment


def _kernels(result: Translation, _: Any) -> None:
    raw = result.raw
    liger_settings = {key: raw.pop(key) for key in LIGER_KEYS if key in raw}
    plugins = raw.pop("plugins", None) or []
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list):
        result.problems.append(f"`plugins` must be a list of plugin class paths (got {plugins!r})")
        plugins = []
    kinds = set()
    for plugin in plugins:
        kind = KERNEL_PLUGINS.get(str(plugin))
        if str(plugin) in REFUSED_PLUGINS:
            _refuse(result, "plugins", REFUSED_PLUGINS[str(plugin)])
        elif kind is None:
            _refuse(result, "plugins", f"the plugin {plugin} is not supported (only kernel plugins: Liger, cut cross-entropy)")
        kinds.add(kind)
    if any(value is True for value in liger_settings.values()):
        if "liger" not in kinds:
            _say(result, next(iter(liger_settings)), "Liger kernels are switched on without the LigerPlugin; loraflow "
                 "turns them on anyway")
        raw.setdefault("liger_kernel", True)
        _say(result, "liger_*", "-> `liger_kernel: true` (transformers applies every Liger kernel the model has; "
             "the kernels change memory and speed, not the training math)")
    if "cut_cross_entropy" in kinds:
        _say(result, "plugins", "CutCrossEntropyPlugin only saves memory in the loss (same loss); not used here")
    if "swanlab" in kinds:
        _say(result, "plugins", "SwanLabPlugin only reports metrics; SwanLab is not wired in (use report_to: [wandb] or [mlflow])")
    if "kernels" in kinds:
        _say(result, "plugins", "KernelsPlugin only selects kernels (same math); not used here")


def _attention(result: Translation, _: Any) -> None:
    raw = result.raw
    for key, implementation in (("sdp_attention", "sdpa"), ("flex_attention", "flex_attention"), ("eager_attention", "eager")):
        if raw.pop(key, None) is True:
            raw.setdefault("attn_implementation", implementation)


def _model_classes(result: Translation, _: Any) -> None:
    raw = result.raw
    model_type = raw.pop("model_type", None) or raw.pop("type_of_model", None)
    raw.pop("type_of_model", None)
    if model_type is not None:
        if str(model_type).endswith("ForCausalLM") or model_type in ("AutoModelForCausalLM", "AutoModel"):
            _say(result, "model_type", f"{model_type}: transformers picks the model class from config.json (AutoModelForCausalLM)")
        elif str(model_type).endswith("ForConditionalGeneration"):
            _say(result, "model_type", f"{model_type}: loraflow trains text, loading the class AutoModelForCausalLM maps "
                 "config.json to (a multimodal model's vision or audio parts get no adapter unless targeted)")
        else:
            _refuse(result, "model_type", f"{model_type} is not a causal LM; loraflow trains AutoModelForCausalLM models")
    tokenizer_type = raw.pop("tokenizer_type", None)
    if tokenizer_type is not None:
        _say(result, "tokenizer_type", f"{tokenizer_type}: AutoTokenizer picks the tokenizer class from the model's files")
    if "model_revision" in raw:  # Axolotl's alias
        raw.setdefault("revision_of_model", raw.pop("model_revision"))


def _pipeline_notices(result: Translation, _: Any) -> None:
    raw = result.raw
    if "dataset_prepared_path" in raw:
        raw.pop("dataset_prepared_path")
        _say(result, "dataset_prepared_path", "prep outputs are content-addressed under `state_dir` (reused when unchanged)")
    for key in ("resume_from_checkpoint", "auto_resume_from_checkpoints"):
        value = raw.pop(key, None)
        if value not in (None, False):
            _say(result, key, "loraflow always resumes from the newest complete checkpoint of the same training run")
    if raw.pop("pad_to_sequence_len", None) is True:
        _say(result, "pad_to_sequence_len", "packed rows are filled to sequence_len already; padding changes no loss")
    if "eval_sample_packing" in raw:
        raw.pop("eval_sample_packing")
        _say(result, "eval_sample_packing", "val loss is token-weighted, so packed and unpacked val rows score the same")
    if raw.pop("group_by_length", None) is True:
        if raw.get("sample_packing", True):
            _say(result, "group_by_length", "packed rows all hold sequence_len tokens: there is nothing to group")
        else:
            _refuse(result, "group_by_length", "grouping unpacked rows by length is not supported; set sample_packing: true")


def _chat_template_name(result: Translation, _: Any) -> None:
    """Axolotl's name for a model family's own format (`qwen3`, `llama4`, ...) reads as the tokenizer's own
    template: the model ships it (Axolotl's copies follow the vendors'). Runs after `_datasets`, which
    lifts a dataset's `chat_template` to the top level."""
    raw = result.raw
    name = raw.get("chat_template")
    if not isinstance(name, str):
        return
    family = name.removeprefix("tokenizer_default_fallback_")
    if family in MODEL_FAMILY_TEMPLATES:
        raw["chat_template"] = "tokenizer_default"
        _say(result, "chat_template", f"{name} -> tokenizer_default: the {family} format is the one the model's tokenizer "
             "ships; prep stops with a clear error if the tokenizer has no chat template")


def _batch_and_warmup(result: Translation, _: Any) -> None:
    """`batch_size` is Axolotl's micro_batch_size x gradient_accumulation_steps; a `warmup_steps` below 1
    is a fraction of the steps, as transformers reads it."""
    raw = result.raw
    batch_size = raw.pop("batch_size", None)
    if batch_size is not None:
        micro = raw.get("micro_batch_size", 1)
        if not isinstance(batch_size, int) or not isinstance(micro, int) or micro < 1 or batch_size < micro:
            result.problems.append(f"`batch_size` must be a whole number >= micro_batch_size (got {batch_size!r})")
        elif "gradient_accumulation_steps" in raw and raw["gradient_accumulation_steps"] * micro != batch_size:
            result.problems.append(f"`batch_size` {batch_size} contradicts micro_batch_size x gradient_accumulation_steps "
                                   f"({micro} x {raw['gradient_accumulation_steps']}); keep one of them")
        elif "gradient_accumulation_steps" not in raw:
            raw["gradient_accumulation_steps"] = max(1, batch_size // micro)
            _say(result, "batch_size", f"{batch_size} -> `gradient_accumulation_steps: {raw['gradient_accumulation_steps']}` "
                 f"(with micro_batch_size {micro}, per process)")
    warmup = raw.get("warmup_steps")
    if isinstance(warmup, float) and 0 < warmup < 1 and "warmup_ratio" not in raw:
        raw["warmup_ratio"] = raw.pop("warmup_steps")
        _say(result, "warmup_steps", f"{warmup} -> `warmup_ratio: {warmup}` (a value below 1 is a fraction of the steps)")


_ATTENTION_ALIASES = {"xformers": "sdpa", "flash_attention_3": "flash_attention_2", "flash_attention_4": "flash_attention_2"}


def _model_loading(result: Translation, _: Any) -> None:
    raw = result.raw
    attention = raw.get("attn_implementation")
    if isinstance(attention, str):
        target = _ATTENTION_ALIASES.get(attention)
        if target is None and "/" in attention:  # a kernel from the hub, e.g. kernels-community/vllm-flash-attn3
            target = "flash_attention_2" if "flash" in attention else "auto"
        if target is not None:
            raw["attn_implementation"] = target
            _say(result, "attn_implementation", f"{attention} -> {target} (the same attention math)")
    if "model_config" in raw:  # Axolotl's alias
        if "overrides_of_model_config" in raw:
            result.problems.append("`model_config` and `overrides_of_model_config` are the same setting; keep one")
        raw["overrides_of_model_config"] = raw.pop("model_config")
    quantization = raw.pop("model_quantization_config", None)
    quantization_options = raw.pop("model_quantization_config_kwargs", None) or {}
    if quantization is not None:
        if quantization == "Mxfp4Config" and quantization_options.get("dequantize") is True:
            _say(result, "model_quantization_config", "Mxfp4Config with dequantize: the MXFP4 weights load dequantized to "
                 "the compute dtype, as loraflow loads MXFP4 checkpoints for training anyway")
        else:
            _refuse(result, "model_quantization_config", f"{quantization} {quantization_options or ''} loads quantized "
                    "weights loraflow cannot train on; only Mxfp4Config with `dequantize: true` is supported")
    unfrozen = raw.get("unfrozen_parameters")
    if unfrozen and (raw.get("adapter") == "qlora" or raw.get("load_in_4bit") is True):
        raw.pop("unfrozen_parameters")
        _say(result, "unfrozen_parameters", "with 4-bit (qlora) base weights only the LoRA adapter (and "
             "lora_modules_to_save) can train; the patterns unfreeze nothing more here")
    fsdp_version = raw.pop("fsdp_version", None)
    if fsdp_version is not None:
        if isinstance(raw.get("fsdp_config"), dict):
            raw["fsdp_config"].setdefault("fsdp_version", fsdp_version)
        elif str(fsdp_version) != "2":
            _say(result, "fsdp_version", FSDP_RULES["version"].reason)


_DEFAULT_ROLES = {"user": ("human", "user"), "assistant": ("gpt", "assistant", "model"), "system": ("system",), "tool": ("tool",)}
# Axolotl type spellings that mean one of ours.
_DATASET_TYPE_ALIASES = {"alpaca:chat": "alpaca", "alpaca:phi": "alpaca", "alpaca_chat": "alpaca", "alpaca_instruct": "alpaca",
                         "sharegpt:chat": "sharegpt", "chat_template.default": "chat_template"}


def _datasets(result: Translation, _: Any) -> None:
    raw = result.raw
    datasets = raw.get("datasets")
    if not isinstance(datasets, list):
        return
    for index, dataset in enumerate(datasets):
        if isinstance(dataset, dict):
            _dataset(result, index, dataset)


def _dataset(result: Translation, index: int, dataset: dict[str, Any]) -> None:
    where = f"datasets[{index}]"
    raw = result.raw
    kind = dataset.get("type")
    if isinstance(kind, dict):
        dataset.pop("type")
        _refuse(result, f"{where}.type", "a custom prompt format (a mapping) is not supported; use type: alpaca or chat_template")
    elif isinstance(kind, str) and kind in _DATASET_TYPE_ALIASES:
        dataset["type"] = _DATASET_TYPE_ALIASES[kind]
    mappings = dict(dataset.get("message_property_mappings") or {})
    thinking = dataset.pop("field_thinking", None)
    template_key = dataset.pop("template_thinking_key", None)
    if thinking is not None:
        # The reasoning column reaches the template under the key the template reads.
        mappings.setdefault(template_key or "reasoning_content", thinking)
    for old, prop in (("message_field_role", "role"), ("message_field_content", "content")):
        if old in dataset:
            mappings.setdefault(prop, dataset.pop(old))
    if mappings:
        dataset["message_property_mappings"] = {"role": "role", "content": "content", **mappings}
    data_files = dataset.get("data_files")
    if data_files is not None and dataset.get("path") in ("json", "parquet", "csv", "arrow"):
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        if len(files) == 1:
            dataset["ds_type"] = dataset.pop("path")
            dataset["path"] = files[0]
            dataset.pop("data_files")
        else:
            _refuse(result, f"{where}.data_files", "several files in one entry are not supported; give each file its own `datasets` entry")
    for key in ("chat_template", "chat_template_jinja"):
        if key in dataset:
            value = dataset.pop(key)
            if raw.get(key) not in (None, value):
                _refuse(result, f"{where}.{key}", f"it differs from the top-level `{key}`; loraflow uses one chat template per run")
            else:
                raw[key] = value
    roles = dataset.pop("roles", None)
    if roles:
        if all(source in _DEFAULT_ROLES.get(target, ()) for target, sources in roles.items() for source in sources):
            _say(result, f"{where}.roles", "Axolotl's default role names (human/gpt/...) are mapped already")
        else:
            _refuse(result, f"{where}.roles", "a custom role mapping is not supported; rename the roles in the data "
                    "(user, assistant, system, tool; ShareGPT's human/gpt are mapped)")
    for key, rule in DATASET_RULES.items():
        if key in dataset and key not in result.dataset_fields:
            value = dataset.pop(key)
            _apply_rule(result, f"{where}.{key}", rule, value)


def _fsdp(result: Translation, _: Any) -> None:
    """Axolotl writes `fsdp_config` keys with an `fsdp_` prefix; FSDP1-only ones get a notice. Renamed
    keys are remembered so errors name them as the file does."""
    settings = result.raw.get("fsdp_config")
    if not isinstance(settings, dict):
        return
    renamed: dict[str, Any] = {}
    for key, value in settings.items():
        bare = str(key).removeprefix("fsdp_")
        rule = FSDP_RULES.get(bare)
        if rule is not None:
            if rule.applies(value):
                _say(result, f"fsdp_config.{key}", rule.reason)
            continue
        renamed[bare] = value
        # FsdpConfig reads two FSDP1 names under its own: errors come back under those.
        field_name = {"offload_params": "cpu_offload", "sharding_strategy": "reshard_after_forward"}.get(bare, bare)
        if field_name != key:
            result.renamed[f"fsdp_config.{field_name}"] = f"fsdp_config.{key}"
    result.raw["fsdp_config"] = renamed


def _ray(result: Translation, _: Any) -> None:
    """Axolotl's Ray Train keys: `use_ray: true` runs the stages on Ray (our `ray:` section, on the
    cluster `ray.init()` finds), `ray_num_workers` is the number of training processes and
    `resources_per_worker` what each asks Ray for."""
    raw = result.raw
    use_ray = raw.pop("use_ray", None)
    settings = {key: raw.pop(key) for key in ("ray_num_workers", "resources_per_worker", "ray_run_name") if key in raw}
    if use_ray is not True:
        if settings:
            _say(result, next(iter(settings)), "`use_ray` is off, so the ray_* settings change nothing")
        return
    ray = raw["ray"] = dict(raw.get("ray") or {})
    _say(result, "use_ray", "each stage runs as a Ray task through prefect-ray, on the cluster `ray.init()` finds (RAY_ADDRESS, "
         "one running on this machine, or a new local one); `ray.address` or `loraflow run --ray ADDRESS` names another")
    workers = settings.get("ray_num_workers")
    if workers is not None:
        if raw.get("num_processes", workers) != workers:
            result.problems.append(f"`ray_num_workers: {workers}` and `num_processes: {raw['num_processes']}` disagree; keep one")
        raw["num_processes"] = workers
        _say(result, "ray_num_workers", f"-> num_processes: {workers}, in one Ray task on one node (Axolotl's Ray Train can "
             "spread its workers over nodes)")
    resources = dict(settings.get("resources_per_worker") or {})
    gpus, cpus = resources.pop("GPU", None), resources.pop("CPU", None)
    if gpus is not None and gpus not in (0, 1):
        _refuse(result, "resources_per_worker", f"GPU: {gpus} asks for {gpus} GPUs per worker and loraflow trains one process "
                "per GPU; use GPU: 1 (or 0 to train on CPUs) and set `ray_num_workers` to the GPU count")
    elif gpus is not None:
        ray.setdefault("gpus", gpus == 1)
    if cpus is not None:
        ray["cpus"] = {"train": cpus, **(ray.get("cpus") or {})}
    if resources:
        ray["resources"] = {**resources, **(ray.get("resources") or {})}
    if "ray_run_name" in settings:
        _say(result, "ray_run_name", "flow runs and artifacts are named by `name`, and outputs go to `output_dir`")


def _rules(result: Translation, _: Any) -> None:
    raw = result.raw
    fields = result.run_fields
    for key in [key for key in raw if key in TOP_LEVEL_RULES and key not in fields]:
        _apply_rule(result, key, TOP_LEVEL_RULES[key], raw.pop(key))


def _apply_rule(result: Translation, key: str, rule: Rule, value: Any) -> None:
    if not rule.applies(value):
        return
    if rule.action == "reject":
        _refuse(result, key, rule.reason)
    else:
        _say(result, key, rule.reason)
