"""Configs written in the shapes of Axolotl's example configs that `loraflow validate` once refused
(issue 15, measured on the 145 LoRA/QLoRA text examples of Axolotl 0.19). Our own configs, one per
pattern, so each fix stays pinned: each validates offline with notes only, and each translation
equals the native setting it stands for."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import stage_settings
from tasks.config_load import check_config, load_config
from tasks.preflight import validate_config

DATA_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
BASE = """\
base_model: example-org/example-model
datasets:
  - path: data/train.jsonl
    type: chat_template
adapter: qlora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
"""

# Each shape: extra YAML and a fragment of the note it must produce.
SHAPES = {
    "moe_qlora_kernels": ("quantize_moe_experts: true\nuse_scattermoe: true\nexperts_implementation: scattermoe\n"
                          "fused_attn_kernel: true\nliger_rms_norm_gated: true\nactivation_offloading: true\n"
                          "lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n",
                          "quantize_moe_experts"),
    "family_chat_template": ("chat_template: qwen3\n", "qwen3 -> tokenizer_default"),
    "gemma3_eot_unfrozen": ("chat_template: gemma3\neot_tokens: ['<end_of_turn>']\n"
                            "unfrozen_parameters: ['^model.language_model.*', '^lm_head.*']\n", "unfrozen_parameters"),
    "mistral_common": ("tokenizer_use_mistral_common: true\n", "tokenizer_use_mistral_common"),
    "flash_attn_implementation": ("attn_implementation: flash_attention_2\nbf16: auto\n", "bf16"),
    "xformers_attention": ("attn_implementation: xformers\n", "xformers -> sdpa"),
    "offloaded_checkpointing": ("gradient_checkpointing: offload\n", "offload -> true"),
    "llama4_text": ("model_type: Llama4ForConditionalGeneration\nllama4_linearized_experts: true\nchat_template: llama4\n",
                    "Llama4ForConditionalGeneration"),
    "old_fp16_recipe": ("fp16: true\nbf16: false\nflash_attention: true\nbatch_size: 8\nmicro_batch_size: 2\n",
                        "fp16"),
    "mixtral_router_logits": ("model_config:\n  output_router_logits: true\n", ""),
    "adam_settings": ("adam_beta2: 0.95\nadam_epsilon: 1.0e-5\noptim_args: {amsgrad: true}\n", ""),
    "fsdp2_top_level_version": ("fsdp_version: 2\nfsdp_config:\n  offload_params: false\n  state_dict_type: SHARDED_STATE_DICT\n"
                                "  final_state_dict_type: FULL_STATE_DICT\n", "state_dict_type"),
    "gpt_oss_thinking": ("model_quantization_config: Mxfp4Config\nmodel_quantization_config_kwargs: {dequantize: true}\n"
                         "attn_implementation: kernels-community/vllm-flash-attn3\nbf16: true\n"
                         "chat_template_kwargs: {reasoning_effort: low}\n", "Mxfp4Config"),
    "reporting_plugins": ("plugins: [axolotl.integrations.swanlab.SwanLabPlugin, "
                          "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\nuse_swanlab: true\n"
                          "swanlab_project: demo\nuse_otel_metrics: true\n", "SwanLab"),
    "zero_evals_and_fractional_warmup": ("evals_per_epoch: 0\nwarmup_steps: 0.1\n", "warmup_ratio"),
}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(DATA_ROW * 20)
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_axolotl_shape_validates_with_notes_only(shape: str, workdir: Path) -> None:
    extra, note_fragment = SHAPES[shape]
    validation = validate_config(write(workdir, BASE + extra))

    assert validation.problems == []
    assert any(note_fragment in note for note in validation.notes)


def test_what_we_cannot_honour_fails_with_one_line_per_feature(workdir: Path) -> None:
    report = check_config(write(workdir, BASE + (
        "plugins: [axolotl.integrations.expert_parallel.ExpertParallelPlugin]\nexpert_parallel_size: 4\n"
        "expert_parallel_token_capacity: 2\nnvfp4_merge_aware: true\n")))

    assert report.problems == [
        "`plugins`, `expert_parallel_size`, `expert_parallel_token_capacity` are known Axolotl settings but expert "
        "parallelism is not supported; MoE experts are trained where the model places them",
        "`nvfp4_merge_aware` is a known Axolotl setting but merge-aware NVFP4 training (LoRA trained against "
        "fake-quantized weights) is not supported",
    ]


def settings(directory: Path, text: str, stage: str = "train") -> dict:
    return stage_settings(load_config(write(directory, BASE + text)), stage)


def test_translations_equal_the_native_settings(workdir: Path) -> None:
    assert settings(workdir, "micro_batch_size: 2\nbatch_size: 8\n") == \
        settings(workdir, "micro_batch_size: 2\ngradient_accumulation_steps: 4\n")
    assert settings(workdir, "model_config: {output_router_logits: true}\n") == \
        settings(workdir, "overrides_of_model_config: {output_router_logits: true}\n")
    assert settings(workdir, "gradient_checkpointing: offload\n") == settings(workdir, "gradient_checkpointing: true\n")
    assert settings(workdir, "warmup_steps: 0.1\n") == settings(workdir, "warmup_ratio: 0.1\n")
    assert settings(workdir, "attn_implementation: xformers\n") == settings(workdir, "attn_implementation: sdpa\n")
    assert settings(workdir, "chat_template: qwen3\n", "prep") == settings(workdir, "chat_template: tokenizer_default\n", "prep")
    assert settings(workdir, "fsdp_version: 2\nfsdp_config: {fsdp_offload_params: true}\n") == \
        settings(workdir, "fsdp_config: {cpu_offload: true}\n")


def test_settings_that_change_training_reach_their_stage(workdir: Path) -> None:
    """Adam settings, parameter targets, rsLoRA and config overrides key the train stage; template
    variables and dropped system turns key prep."""
    assert settings(workdir, "adam_beta2: 0.95\n") != settings(workdir, "")
    assert settings(workdir, "lora_target_parameters: [mlp.experts.down_proj]\n") != settings(workdir, "")
    assert settings(workdir, "peft_use_rslora: true\n") != settings(workdir, "")
    assert settings(workdir, "chat_template_kwargs: {enable_thinking: false}\n", "prep") != settings(workdir, "", "prep")


def test_thinking_fields_and_dropped_system_turns_shape_the_messages(workdir: Path) -> None:
    from tasks.formats import to_messages

    cfg = load_config(write(workdir, BASE.replace("    type: chat_template\n", (
        "    type: chat_template\n    field_thinking: reasoning\n    template_thinking_key: thinking\n"
        "    drop_system_message: true\n"))))
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning": "add them"}]}

    _, messages = to_messages(cfg.datasets[0], row)

    assert messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "add them"}]


def test_named_templates_render_prefixes_as_prefixes_and_template_variables_apply() -> None:
    """Prep finds turn boundaries by rendering prefixes: each carried template must keep them prefixes."""
    from jinja2 import Environment

    from tasks.tokenizer import NAMED_CHAT_TEMPLATES, with_template_variables

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]
    for name in ("gemma3", "phi_3"):
        template = Environment().from_string(NAMED_CHAT_TEMPLATES[name])
        rendered = [template.render(messages=messages[:count], bos_token="<s>", eos_token="</s>")
                    for count in range(1, len(messages) + 1)]
        assert all(longer.startswith(shorter) for shorter, longer in zip(rendered, rendered[1:])), name
        prompt = template.render(messages=messages[:2], bos_token="<s>", add_generation_prompt=True)
        assert rendered[2].startswith(prompt) and rendered[2].endswith("A" + ("<end_of_turn>\n" if name == "gemma3" else "<|end|>\n"))
    variables = Environment().from_string(with_template_variables("{{ 'think' if enable_thinking else 'plain' }}",
                                                                  {"enable_thinking": False}))
    assert variables.render(enable_thinking=True) == "plain"


def test_adam_settings_and_optimizer_arguments_reach_the_trainer(workdir: Path) -> None:
    from tasks.train import training_arguments

    cfg = load_config(write(workdir, BASE.replace("adapter: qlora\n", "adapter: lora\n") + (
        "adam_beta1: 0.8\nadam_beta2: 0.95\nadam_epsilon: 1.0e-6\noptim_args: {amsgrad: true}\n")))
    arguments = training_arguments(cfg, workdir / "checkpoints", has_val=False)
    defaults = training_arguments(load_config(write(workdir, BASE)), workdir / "checkpoints", has_val=False)

    assert (arguments.adam_beta1, arguments.adam_beta2, arguments.adam_epsilon, arguments.optim_args) == (0.8, 0.95, 1e-6, "amsgrad=True")
    assert (defaults.adam_beta1, defaults.adam_beta2, defaults.adam_epsilon, defaults.optim_args) == (0.9, 0.999, 1e-8, None)


def test_config_overrides_rslora_and_template_variables_reach_the_model(tiny_model_dir: Path, workdir: Path) -> None:
    from tasks.tokenizer import load_tokenizer
    from tasks.train import load_model_for_training

    lora_base = BASE.replace("example-org/example-model", str(tiny_model_dir)).replace("adapter: qlora\n", "adapter: lora\n")
    cfg = load_config(write(workdir, lora_base + (
        "model_config: {output_router_logits: true}\npeft_use_rslora: true\nchat_template: chatml\n"
        "chat_template_kwargs: {enable_thinking: false}\n")))
    model = load_model_for_training(cfg)

    assert model.base_model.model.config.output_router_logits is True
    assert model.peft_config["default"].use_rslora is True
    assert load_tokenizer(cfg).chat_template.startswith("{%- set enable_thinking = false -%}")
