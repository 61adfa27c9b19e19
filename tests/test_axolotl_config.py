"""Axolotl's config semantics: blank keys, every documented key handled, translations that train the
same as the native setting, one-pass `loraflow validate`, and the guide configs of issue 15."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import ConfigError, stage_settings
from tasks.config_load import check_config, load_config
from tasks.preflight import validate_config

LORAFLOW = Path(sys.executable).with_name("loraflow")
DATA_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

# Top-level keys of Axolotl's schema (src/axolotl/utils/schemas/: config.py, model.py, peft.py,
# training.py, integrations.py, deprecated.py) and its config reference, written out here so that a
# key dropped from our tables fails this test.
AXOLOTL_DOCUMENTED_KEYS = """
base_model base_model_config revision_of_model tokenizer_config model_type tokenizer_type trust_remote_code
tokenizer_use_fast tokenizer_legacy resize_token_embeddings_to_32x shrink_embeddings embeddings_skip_upcast
random_init_weights is_falcon_derived_model is_llama_derived_model is_qwen_derived_model is_mistral_derived_model
overrides_of_model_config overrides_of_model_kwargs bnb_config_kwargs qat quantization gptq load_in_8bit load_in_4bit
bf16 fp16 tf32 bfloat16 float16 float32 gpu_memory_limit lora_on_cpu plugins datasets shuffle_merged_datasets
dataset_exact_deduplication test_datasets rl rl_beta dpo_use_weighting rpo_alpha orpo_alpha kto_desirable_weight
kto_undesirable_weight cpo_alpha simpo_gamma trl reward_model process_reward_model chat_template chat_template_jinja
eot_tokens default_system_message dataset_prepared_path push_dataset_to_hub dataset_processes dataset_keep_in_memory
hub_model_id hub_strategy hf_use_auth_token val_set_size dataset_shard_num dataset_shard_idx sequence_len
pad_to_sequence_len sample_packing eval_sample_packing sample_packing_eff_est total_num_tokens sample_packing_group_size
sample_packing_bin_size pretraining_sample_concatenation curriculum_sampling batch_flattening device_map max_memory
adapter lora_model_dir lora_r lora_alpha lora_dropout lora_target_modules lora_target_linear peft_layers_to_transform
peft_use_dora peft_use_rslora peft_layer_replication peft_init_lora_weights lora_modules_to_save lora_fan_in_fan_out
lora_mlp_kernel lora_qkv_kernel lora_o_kernel loraplus_lr_ratio loraplus_lr_embedding peft relora_prune_ratio
relora_cpu_offload wandb_mode wandb_project wandb_entity wandb_watch wandb_name wandb_run_id wandb_log_model
mlflow_tracking_uri mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts use_comet comet_api_key
comet_workspace comet_project_name comet_experiment_key comet_mode comet_online comet_experiment_config use_tensorboard
output_dir torch_compile torch_compile_backend gradient_accumulation_steps micro_batch_size eval_batch_size num_epochs
warmup_steps warmup_ratio learning_rate lr_quadratic_warmup logging_steps eval_steps evals_per_epoch eval_strategy
save_strategy save_steps saves_per_epoch save_total_limit save_only_model max_steps include_tokens_per_second
auto_find_batch_size eval_table_size eval_max_new_tokens do_causal_lm_eval eval_causal_lm_metrics profiler_steps
loss_watchdog_threshold loss_watchdog_patience save_safetensors train_on_inputs group_by_length gradient_checkpointing
gradient_checkpointing_kwargs early_stopping_patience lr_scheduler lr_scheduler_kwargs cosine_min_lr_ratio
cosine_constant_lr_ratio lr_div_factor optimizer optim_args optim_target_modules weight_decay adam_beta1 adam_beta2
adam_beta3 adam_epsilon adam_epsilon2 max_grad_norm neftune_noise_alpha flash_optimum xformers_attention flash_attention
flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp sdp_attention s2_attention
low_cpu_mem_usage resume_from_checkpoint auto_resume_from_checkpoints image_size image_resize_algorithm local_rank
special_tokens tokens added_tokens_overrides fsdp fsdp_config deepspeed ddp_timeout ddp_bucket_cap_mb
ddp_broadcast_buffers sequence_parallel_degree heads_k_stride ring_attn_func torchdistx_path pretraining_dataset debug
seed strict mean_resizing_embeddings num_labels dpo_use_logits_to_keep dataloader_pin_memory dataloader_num_workers
dataloader_prefetch_factor dataloader_drop_last accelerator_config remove_unused_columns device world_size ddp
ddp_find_unused_parameters do_bench_eval bench_dataset bench_split metric_for_best_model greater_is_better gc_steps
unfrozen_parameters min_sample_len max_prompt_len multipack_real_batches use_pose pose_split_on_token_ids
pose_max_context_len pose_num_chunks pretrain_multipack_buffer_size pretrain_multipack_attn flex_attention
flex_attn_compile_kwargs eager_attention unsloth_cross_entropy_loss unsloth_lora_mlp unsloth_lora_qkv unsloth_lora_o
unsloth_rms_norm unsloth_rope llama4_linearized_experts fsdp_final_state_dict_type torch_compile_mode
load_best_model_at_end fix_untrained_tokens is_preprocess preprocess_iterable total_supervised_tokens
axolotl_config_path cls_model_config tokenizer_use_mistral_common processor_type tokenizer_save_jinja_files
experimental_skip_move_to_device use_kernels model_quantization_config model_quantization_config_kwargs hub_revision
lora_target_parameters peft_layers_pattern peft_trainable_token_indices peft_ensure_weight_tying
peft_autocast_adapter_dtype qlora_sharded_model_loading merge_lora merge_method relora relora_prune_method use_mlflow
lisa_n_layers lisa_step_interval lisa_layers_attribute use_wandb gradio_title gradio_share gradio_server_name
gradio_server_port gradio_max_new_tokens gradio_temperature use_ray ray_run_name ray_num_workers resources_per_worker
batch_size embedding_lr embedding_lr_scale max_packed_sequence_len rope_scaling noisy_embedding_alpha dpo_beta
evaluation_strategy dpo_generate_during_eval dpo_norm_loss model_config model_kwargs fp8 skip_prepare_dataset
sample_packing_sequentially
""".split()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(DATA_ROW * 4)
    return tmp_path


def write(directory: Path, text: str, name: str = "run.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def minimal(base_model: str = "models/tiny") -> str:
    return f"base_model: {base_model}\ndatasets:\n  - path: rows.jsonl\n"


# --- blank means unset ---------------------------------------------------------------------------


def test_blank_keys_are_unset_at_any_depth(workdir: Path) -> None:
    text = minimal() + (
        "wandb_entity:\nwandb_name: ''\nlora_model_dir:\nresume_from_checkpoint:\nlearning_rate:\n"
        "datasets:\n  - path: rows.jsonl\n    type:\n    conversation_extension: null\n"
        "eval:\n  max_samples:\n"
    )
    cfg = load_config(write(workdir, text))

    assert cfg.learning_rate == 2e-4 and cfg.datasets[0].type == "chat_template"
    assert cfg.eval.max_samples == 200 and cfg.lora_model_dir is None and cfg.report_to == []


def test_a_blank_adapter_means_full_fine_tuning_and_is_refused(workdir: Path) -> None:
    with pytest.raises(ConfigError, match="full fine-tuning"):
        load_config(write(workdir, minimal() + "adapter:\n"))


# --- every documented key is handled -------------------------------------------------------------


@pytest.mark.parametrize("key", AXOLOTL_DOCUMENTED_KEYS)
def test_no_documented_axolotl_key_is_unknown(key: str, workdir: Path) -> None:
    report = check_config(write(workdir, minimal() + f"{key}: true\n"))

    assert not any("unknown key" in problem for problem in report.problems), report.problems


@pytest.mark.parametrize("key", ["lora_model_dir", "torch_dtype", "fp16", "wandb_project", "special_tokens"])
def test_keys_of_another_meaning_never_get_a_did_you_mean(key: str, workdir: Path) -> None:
    value = {"torch_dtype": "bfloat16", "fp16": "false", "special_tokens": "{pad_token: '<pad>'}"}.get(key, "x")
    report = check_config(write(workdir, minimal() + f"{key}: {value}\n"))

    assert not any("did you mean" in problem or "unknown key" in problem for problem in report.problems), report.problems


def test_real_typos_still_get_a_did_you_mean_and_others_none(workdir: Path) -> None:
    report = check_config(write(workdir, minimal() + "learning_rat: 1e-4\nsaves_per_epok: 2\ncompletely_new_thing: 1\n"))

    assert any("`learning_rat`: did you mean `learning_rate`" in p for p in report.problems)
    assert any("`saves_per_epok`: did you mean `saves_per_epoch`" in p for p in report.problems)
    assert any(p == "unknown key `completely_new_thing`" for p in report.problems)


def test_rejected_keys_name_the_reason(workdir: Path) -> None:
    report = check_config(write(workdir, minimal() + "rl: dpo\npeft_use_dora: true\nrelora: true\njagged_restart_steps: 50\n"))

    assert any(p.startswith("`rl` is a known Axolotl setting but preference tuning") for p in report.problems)
    assert any("DoRA is not supported" in p for p in report.problems)
    # One feature, one line: ReLoRA's keys are named together.
    assert "`relora`, `jagged_restart_steps` are known Axolotl settings but ReLoRA restarts are not supported" in report.problems
    assert len(report.problems) == 3


def test_noticed_keys_load_with_one_line_each(workdir: Path) -> None:
    cfg = load_config(write(workdir, minimal() + (
        "strict: false\ndebug: true\nmodel_type: LlamaForCausalLM\ntokenizer_type: AutoTokenizer\n"
        "dataset_prepared_path: last_run_prepared\nresume_from_checkpoint: ./ckpt\npad_to_sequence_len: true\n"
        "eval_sample_packing: true\nwandb_watch: gradients\n"
    )))

    keys = [note.split("`")[1] for note in cfg.notes]
    assert {"debug", "model_type", "tokenizer_type", "dataset_prepared_path", "resume_from_checkpoint",
            "pad_to_sequence_len", "eval_sample_packing", "wandb_watch"} <= set(keys)
    assert "strict" not in keys  # `strict: false` says nothing


# --- translations equal the native settings ------------------------------------------------------


def settings(directory: Path, text: str) -> dict:
    return stage_settings(load_config(write(directory, minimal() + text)), "train")


def test_lora_target_linear_is_all_linear(workdir: Path) -> None:
    assert settings(workdir, "lora_target_linear: true\n") == settings(workdir, "lora_target_modules: all-linear\n")


def test_saves_and_evals_per_epoch_are_fractions_of_the_planned_steps(workdir: Path) -> None:
    assert settings(workdir, "num_epochs: 2\nsaves_per_epoch: 4\nevals_per_epoch: 2\n") == \
        settings(workdir, "num_epochs: 2\nsave_steps: 0.125\neval_steps: 0.25\n")


def test_precision_auto_resolves_to_fp32_without_a_gpu(workdir: Path) -> None:
    cfg = load_config(write(workdir, minimal() + "bf16: auto\nfp16: auto\ntf32: auto\n"))

    assert (cfg.bf16, cfg.tf32, cfg.precision_was_auto) == (False, False, True)
    assert settings(workdir, "bf16: auto\ntf32: auto\n") == settings(workdir, "bf16: false\ntf32: false\n")
    assert settings(workdir, "torch_dtype: bfloat16\n") == settings(workdir, "bf16: true\n")
    # fp16 mixed precision reads as bf16 mixed precision (named in a note).
    assert settings(workdir, "fp16: true\n") == settings(workdir, "bf16: true\n")


def test_optimizer_aliases_and_reporting_keys(workdir: Path) -> None:
    assert settings(workdir, "optimizer: ao_adamw_8bit\n") == settings(workdir, "optimizer: adamw_torch_8bit\n")
    for name in ("adamw_8bit", "adamw_torch_8bit", "paged_adamw_32bit", "adamw_bnb_8bit", "adafactor"):
        assert load_config(write(workdir, minimal() + f"optimizer: {name}\n")).optimizer == name
    cfg = load_config(write(workdir, minimal() + "wandb_project: demo\nwandb_entity: team\nmlflow_tracking_uri: http://127.0.0.1:5000\n"))
    assert cfg.report_to == ["wandb", "mlflow"]
    assert cfg.tracking_env == {"WANDB_PROJECT": "demo", "WANDB_ENTITY": "team", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert load_config(write(workdir, minimal() + "wandb_project: demo\nwandb_mode: disabled\n")).report_to == []


def test_liger_plugin_keys_switch_on_liger_kernel_and_other_plugins_are_refused(workdir: Path) -> None:
    text = "plugins:\n  - axolotl.integrations.liger.LigerPlugin\nliger_rope: true\nliger_rms_norm: true\n"
    assert settings(workdir, text) == settings(workdir, "liger_kernel: true\n")
    report = check_config(write(workdir, minimal() + "plugins: [axolotl.integrations.kd.KDPlugin]\n"))
    assert any("KDPlugin is not supported" in p for p in report.problems)


def test_dataset_keys_translate(workdir: Path) -> None:
    cfg = load_config(write(workdir, minimal("models/tiny").replace("  - path: rows.jsonl\n", (
        "  - path: json\n    data_files: rows.jsonl\n    message_field_role: from\n    message_field_content: value\n"
        "    roles: {user: [human], assistant: [gpt]}\n"
    ))))

    dataset = cfg.datasets[0]
    assert (dataset.path, dataset.ds_type) == ("rows.jsonl", "json")
    assert dataset.message_property_mappings == {"role": "from", "content": "value"}


def test_fsdp_keys_are_reported_under_the_names_the_file_uses(workdir: Path) -> None:
    text = "fsdp: [full_shard, auto_wrap]\nfsdp_config:\n  fsdp_limit_all_gathers: true\n  fsdp_offload_params: maybe\n"
    report = check_config(write(workdir, minimal() + text))

    assert any(p.startswith("`fsdp_config.fsdp_offload_params`") or "`fsdp_config.fsdp_offload_params`" in p
               for p in report.problems), report.problems
    assert any("fsdp_config.fsdp_limit_all_gathers" in note for note in report.notes)


# --- one pass of checks --------------------------------------------------------------------------


def test_validate_reports_schema_and_preflight_problems_and_notes_together(workdir: Path) -> None:
    text = "base_model: org/absent-model\ndatasets:\n  - path: missing.jsonl\nlearning_rat: 1e-4\noptimizer: adamw_8bit\n"
    validation = validate_config(write(workdir, text))

    assert any("learning_rat" in p for p in validation.problems)
    assert any("missing.jsonl not found" in p for p in validation.problems)  # preflight, despite the schema error
    assert any(n.startswith("model checks skipped") for n in validation.notes)
    assert any(n.startswith("GPU checks skipped") and "optimizer" in n for n in validation.notes)


def test_validate_json_on_a_machine_without_model_or_gpu_exits_0_with_notes(workdir: Path) -> None:
    text = ("base_model: org/model\ndatasets:\n  - path: org/hub-dataset\n    type: alpaca\n"
            "flash_attention: true\nbf16: auto\nval_set_size: 0\n")
    path = write(workdir, text)

    completed = subprocess.run([str(LORAFLOW), "validate", "--json", str(path)], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["problems"] == [] and answer["memory_estimate"] is None
    notes = " | ".join(answer["notes"])
    assert "model checks skipped" in notes and "dataset checks skipped" in notes and "val_set_size: 0" in notes
    assert "GPU checks skipped" in notes and "flash_attention" in notes


def test_run_preflight_still_refuses_what_this_machine_cannot_run(workdir: Path) -> None:
    from tasks.preflight import preflight

    cfg = load_config(write(workdir, minimal() + "optimizer: paged_adamw_32bit\nflash_attention: true\nbf16: auto\n"))
    with pytest.raises(ConfigError) as raised:
        preflight(cfg, "run.yaml", for_run=True)
    message = str(raised.value)
    assert "`optimizer: paged_adamw_32bit` needs a CUDA GPU" in message and "adamw_torch" in message
    assert "flash-attn is not installed" in message


# --- the guide configs of issue 15 ---------------------------------------------------------------

GUIDE_CONFIG_1 = """\
base_model: meta-llama/Meta-Llama-3-8B-Instruct
base_model_config: meta-llama/Meta-Llama-3-8B-Instruct
model_type: LlamaForCausalLM
tokenizer_type: LlamaTokenizer
datasets:
  - path: ./data/financial_qa.jsonl
    type: chatml
    conversation_extension: null
output_dir: ./outputs/llama3-finetune
hub_model_id: your-org/llama3-finetune
sequence_len: 8192
sample_packing: true
lora_config:
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  r: 16
  lora_alpha: 16
  lora_dropout: 0.05
  bias: none
  task_type: CAUSAL_LM
num_epochs: 3
micro_batch_size: 1
gradient_accumulation_steps: 16
gradient_checkpointing: true
learning_rate: 0.0002
optimizer: adamw_torch
lr_scheduler: cosine
warmup_ratio: 0.03
max_grad_norm: 1.0
bf16: true
flash_attention: true
deepspeed: ./deepspeed_config.json   # ZeRO-3, optimizer and params offloaded to CPU
"""

GUIDE_CONFIG_2 = """\
base_model: deepseek-ai/DeepSeek-V3-Base
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
torch_dtype: bfloat16
trust_remote_code: true
datasets:
  - path: ./data/domain_dataset.jsonl
    type: chatml
    field_messages: messages
    message_col_as_content: null
lora_config:
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, embed_tokens, lm_head]
  r: 32
  lora_alpha: 64
  lora_dropout: 0.1
  modules_to_save: [embed_tokens, lm_head]
num_epochs: 5
micro_batch_size: 2
gradient_accumulation_steps: 8
learning_rate: 3e-4
weight_decay: 0.01
warmup_steps: 100
max_steps: 2000
val_set_size: 0.1
save_steps: 200
eval_steps: 200
logging_steps: 50
save_total_limit: 3
"""


def zero3_json(accumulation: object) -> str:
    return json.dumps({
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                              "gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": accumulation,
    })


@pytest.fixture
def guide_dir(workdir: Path) -> Path:
    (workdir / "data").mkdir()
    for name in ("financial_qa.jsonl", "domain_dataset.jsonl"):
        (workdir / "data" / name).write_text(DATA_ROW * 4)
    return workdir


def test_guide_config_1_validates_with_notes_only(guide_dir: Path) -> None:
    (guide_dir / "deepspeed_config.json").write_text(zero3_json("auto"))

    validation = validate_config(write(guide_dir, GUIDE_CONFIG_1))

    assert validation.problems == []
    assert any("`model_type`" in note for note in validation.notes)


def test_guide_config_1_reports_a_deepspeed_json_that_contradicts_it(guide_dir: Path) -> None:
    (guide_dir / "deepspeed_config.json").write_text(zero3_json(8))

    validation = validate_config(write(guide_dir, GUIDE_CONFIG_1))

    assert len(validation.problems) == 1
    assert "gradient_accumulation_steps is 8 but gradient_accumulation_steps is 16" in validation.problems[0]


def test_guide_config_2_validates_with_notes_only(guide_dir: Path) -> None:
    validation = validate_config(write(guide_dir, GUIDE_CONFIG_2))

    assert validation.problems == []
    assert any("`torch_dtype`: bfloat16 -> `bf16: true`" in note for note in validation.notes)


# --- the tokenizer and the model, on the tiny model ----------------------------------------------


def test_special_tokens_chat_template_and_new_embedding_rows(tiny_model_dir: Path, workdir: Path) -> None:
    from tasks.tokenizer import load_tokenizer
    from tasks.train import load_model_for_training

    cfg = load_config(write(workdir, minimal(str(tiny_model_dir)) + (
        "chat_template: chatml\nspecial_tokens:\n  pad_token: '<|pad|>'\n  eos_token: '<|im_end|>'\ntokens: ['<|tool|>']\n"
        "lora_target_modules: [q_proj]\n"
    )))
    tokenizer = load_tokenizer(cfg)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|tool|>") != tokenizer.unk_token_id
    model = load_model_for_training(cfg)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("embed_tokens" in name and "modules_to_save" in name for name in trainable)


def test_lora_model_dir_warm_starts_from_the_saved_adapter(tiny_model_dir: Path, workdir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.train import load_model_for_training

    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    trained.save_pretrained(workdir / "adapter")
    cfg = load_config(write(workdir, minimal(str(tiny_model_dir)) + f"lora_model_dir: {workdir / 'adapter'}\n"))

    model = load_model_for_training(cfg)

    saved = {name: value for name, value in trained.state_dict().items() if "lora_B" in name}
    loaded = dict(model.state_dict())
    assert saved and all(torch.equal(loaded[name], value) for name, value in saved.items())
    assert any(parameter.requires_grad for name, parameter in model.named_parameters() if "lora_B" in name)
