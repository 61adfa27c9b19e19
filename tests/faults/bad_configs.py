"""Bad configs as data: each must fail in preflight (`load_config` + `preflight`, what `loraflow
validate` runs), in seconds, with a ConfigError whose message holds every `expect` string: the
setting and the fix.

A case is a change to a valid base config (the tiny model, the quickstart data and contract):
`set` maps dotted paths to new values (`DELETE` removes the key), `raw` replaces the whole file,
`files` writes extra files first (paths relative to the case directory). `bug` marks a case that
does not fail in preflight today: a strict xfail naming what happens instead.

Decided not bad (no case): `bf16: true` on a CPU-only machine trains with CPU bf16 autocast, slowly
but correctly; `val_set_size: 1.5` (>= 1 is a row count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.faults.harness import QUICKSTART_DATA, REPO

DELETE = object()
PASTED_KEY = "sk-proj-CANARYpastedKEY0123456789abcdef"


@dataclass(frozen=True)
class BadConfig:
    name: str
    expect: tuple[str, ...]
    set: dict[str, Any] = field(default_factory=dict)
    raw: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    bug: str | None = None
    must_not_contain: tuple[str, ...] = ()


DEEPSPEED_JSON = '{"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}'

CASES: list[BadConfig] = [
    # the classic ones
    BadConfig("dataset_field_not_in_the_data", ("no column 'conversation'", "datasets[0]", "columns: messages"),
              set={"datasets.0.field_messages": "conversation"}),
    BadConfig("dataset_key_misspelled", ("feild_messages", "did you mean `field_messages`"), set={"datasets.0.feild_messages": "messages"}),
    BadConfig("flash_attention_with_fp32", ("flash_attention: true", "set `bf16: true`"), set={"flash_attention": True}),
    BadConfig("deepspeed_config_contradicting_the_yaml",
              ("`deepspeed`", "train_micro_batch_size_per_gpu is 16 but micro_batch_size is 1", '"auto"'),
              set={"deepspeed": "ds_zero3.json"}, files={"ds_zero3.json": DEEPSPEED_JSON}),
    BadConfig("sequence_len_above_model_max", ("`sequence_len` 4096", "set sequence_len <= 2048"), set={"sequence_len": 4096}),
    BadConfig("lora_target_module_not_in_model", ("query_key_value", "`lora_target_modules`", "q_proj"),
              set={"lora_target_modules": ["q_proj", "query_key_value"]}),
    BadConfig("lora_config_block_target_not_in_model", ("c_attn", "`lora_target_modules`"),
              set={"lora_config": {"target_modules": ["c_attn"]}}),
    BadConfig("micro_batch_size_zero", ("`micro_batch_size`", "greater than or equal to 1", "got 0"), set={"micro_batch_size": 0}),
    BadConfig("learning_rate_unparsable", ("`learning_rate`", "valid number", "two e-4"),
              set={"learning_rate": "two e-4"}),
    # precision, kernels, devices
    BadConfig("flash_attention_not_installed", ("flash-attn is not installed", "flash_attention: false"),
              set={"flash_attention": True, "bf16": True}),
    BadConfig("flash_attention_contradicts_attn_implementation", ("attn_implementation: sdpa", "keep one of them"),
              set={"flash_attention": True, "bf16": True, "attn_implementation": "sdpa"}),
    BadConfig("attn_implementation_unknown", ("`attn_implementation`", "flex_attention"), set={"attn_implementation": "paged_attention"}),
    BadConfig("paged_adamw_8bit_without_gpu", ("`optimizer: paged_adamw_8bit`", "needs a CUDA GPU", "adamw_torch"),
              set={"optimizer": "paged_adamw_8bit"}),
    BadConfig("adamw_bnb_8bit_without_gpu", ("`optimizer: adamw_bnb_8bit`", "needs a CUDA GPU"), set={"optimizer": "adamw_bnb_8bit"}),
    BadConfig("optimizer_unknown", ("`optimizer`", "adamw_torch"), set={"optimizer": "lion"}),
    BadConfig("vllm_endpoint_without_vllm", ("`eval.endpoint: vllm`", "eval.endpoint: local"), set={"eval.endpoint": "vllm"}),
    # schedule and optimisation values
    BadConfig("lr_scheduler_unknown", ("`lr_scheduler`", "cosine"), set={"lr_scheduler": "cosine_with_restarts_typo"}),
    BadConfig("num_epochs_zero", ("`num_epochs`", "greater than 0"), set={"num_epochs": 0}),
    BadConfig("max_steps_zero", ("`max_steps`", "greater than or equal to 1"), set={"max_steps": 0}),
    BadConfig("gradient_accumulation_steps_zero", ("`gradient_accumulation_steps`",), set={"gradient_accumulation_steps": 0}),
    BadConfig("warmup_ratio_above_one", ("`warmup_ratio`", "less than 1"), set={"warmup_ratio": 1.5}),
    BadConfig("lora_dropout_negative", ("`lora_dropout`", "greater than or equal to 0"), set={"lora_dropout": -0.1}),
    BadConfig("lora_alpha_string", ("`lora_alpha`", "valid integer", "sixteen"), set={"lora_alpha": "sixteen"}),
    BadConfig("sequence_len_string", ("`sequence_len`", "valid integer"), set={"sequence_len": "2k"}),
    BadConfig("sample_packing_maybe", ("`sample_packing`", "valid boolean", "maybe"), set={"sample_packing": "maybe"}),
    BadConfig("trust_remote_code_string", ("`trust_remote_code`", "valid boolean"), set={"trust_remote_code": "yes please"}),
    BadConfig("val_set_size_negative", ("`val_set_size`", "greater than or equal to 0"), set={"val_set_size": -0.1}),
    BadConfig("adapter_unknown", ("`adapter`", "'lora' or 'qlora'"), set={"adapter": "dora"}),
    # model and data locations
    BadConfig("base_model_missing", ("`base_model`", "Field required"), set={"base_model": DELETE}),
    BadConfig("base_model_dir_missing", ("`base_model`", "no-such-model", "loraflow tiny-model"),
              set={"base_model": "models/no-such-model"}),
    BadConfig("datasets_empty", ("`datasets`", "at least 1 item"), set={"datasets": []}),
    BadConfig("dataset_path_missing", ("`datasets[0].path`", "not found"), set={"datasets.0.path": "data/missing.jsonl"}),
    BadConfig("dataset_type_unknown", ("`datasets.0.type`", "chat_template"), set={"datasets.0.type": "oasst"}),
    BadConfig("contract_name_missing", ("`datasets[0].contract`", "no_such_contract"), set={"datasets.0.contract": "no_such_contract"}),
    BadConfig("contract_yaml_malformed", ("`datasets[0].contract`", "broken"),
              set={"datasets.0.contract": "broken", "contract.dir": "contracts"},
              files={"contracts/broken.yaml": "expectations:\n  - expectation: [unclosed\n"}),
    BadConfig("max_rejected_fraction_above_one", ("`contract.max_rejected_fraction`", "less than or equal to 1"),
              set={"contract.max_rejected_fraction": 2}),
    # eval, export, secrets
    BadConfig("external_eval_without_base_url", ("`eval.endpoint: external`", "`eval.base_url`"),
              set={"eval.endpoint": "external", "eval.model": "tuned"}),
    BadConfig("api_key_env_is_a_pasted_key", ("`eval.api_key_env`", "NAME of an environment variable"),
              set={"eval.api_key_env": PASTED_KEY}, must_not_contain=(PASTED_KEY, PASTED_KEY[:16])),
    BadConfig("judge_api_key_env_is_a_pasted_key", ("`eval.judge.api_key_env`", "NAME of an environment variable"),
              set={"eval.judge": {"base_url": "http://127.0.0.1:9/v1", "model": "judge", "api_key_env": PASTED_KEY}},
              must_not_contain=(PASTED_KEY, PASTED_KEY[:16])),
    BadConfig("api_key_env_and_secret_both", ("`eval`", "not both"),
              set={"eval.api_key_env": "EVAL_KEY", "eval.api_key_secret": "eval-key"}),
    BadConfig("api_key_env_not_set", ("`eval.api_key_env`", "LORAFLOW_FAULTS_UNSET_KEY", "not set"),
              set={"eval.endpoint": "external", "eval.base_url": "http://127.0.0.1:9/v1", "eval.model": "tuned",
                   "eval.api_key_env": "LORAFLOW_FAULTS_UNSET_KEY"}),
    BadConfig("judge_without_compare_base", ("`eval.compare_base: true`",),
              set={"eval.compare_base": False, "eval.judge": {"base_url": "http://127.0.0.1:9/v1", "model": "judge"}}),
    BadConfig("merge_dtype_int8", ("`export.merge_dtype`", "float32"), set={"export.merge_dtype": "int8"}),
    BadConfig("gguf_with_adapter_only", ("adapter_only: false",), set={"export.gguf": True, "export.adapter_only": True}),
    BadConfig("quantize_with_adapter_only", ("export.quantize (nf4)", "adapter_only: false"),
              set={"export.quantize": ["nf4"], "export.adapter_only": True}),
    BadConfig("quantize_unknown_format", ("export.quantize", "gptq_w4a16"), set={"export.quantize": ["gptq"]}),
    BadConfig("promote_if_without_bound", ("`accuracy`", "needs `min`, `max`, `max_regression` or `min_improvement`"),
              set={"export.promote_if": [{"metric": "accuracy"}]}),
    BadConfig("report_to_unknown", ("`report_to", "tensorboard"), set={"report_to": "comet_ml"}),
    # keys and file shape
    BadConfig("unknown_top_level_key", ("unknown key `learning_rat`", "did you mean `learning_rate`"), set={"learning_rat": 2e-4}),
    BadConfig("unknown_nested_key", ("unknown key `eval.max_sample`", "did you mean `max_samples`"), set={"eval.max_sample": 3}),
    BadConfig("fsdp_two_sharding_strategies", ("`fsdp`", "choose one of full_shard and shard_grad_op"),
              set={"fsdp": ["full_shard", "shard_grad_op"]}),
    BadConfig("fsdp_config_key_misspelled", ("fsdp_config.transformer_layer_cls_to_wrapp", "did you mean `transformer_layer_cls_to_wrap`"),
              set={"fsdp_config": {"fsdp_transformer_layer_cls_to_wrapp": "LlamaDecoderLayer"}}),
    BadConfig("deepspeed_and_fsdp_together", ("`deepspeed` and `fsdp`", "keep one of them"),
              set={"deepspeed": "ds_zero3.json", "fsdp": ["full_shard"]}, files={"ds_zero3.json": DEEPSPEED_JSON}),
    BadConfig("deepspeed_json_missing", ("`deepspeed`", "cannot read", "nowhere.json"), set={"deepspeed": "nowhere.json"}),
    BadConfig("fsdp_on_one_process", ("`fsdp` shards the model across processes but 1 will run", "num_processes"),
              set={"fsdp": ["full_shard", "auto_wrap"]}),
    BadConfig("num_processes_zero", ("`num_processes`", "greater than or equal to 1"), set={"num_processes": 0}),
    BadConfig("load_in_8bit_switched_on", ("`load_in_8bit`", "adapter: qlora"), set={"load_in_8bit": True}),
    BadConfig("yaml_not_a_mapping", ("expected a mapping of settings",), raw="- base_model: x\n- datasets: []\n"),
    BadConfig("yaml_syntax_error", ("not valid YAML", "line"), raw="base_model: x\ndatasets:\n  - path: [unclosed\n"),
    BadConfig("yaml_python_object_tag", ("not valid YAML", "python/object/apply:os.system"),
              raw="base_model: !!python/object/apply:os.system ['touch PWNED']\ndatasets: []\n"),
    BadConfig("empty_file", ("expected a mapping of settings",), raw=""),
]


def _base_raw(base_model: Path, data: Path) -> dict[str, Any]:
    return {
        "base_model": str(base_model),
        "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "messages", "contract": "quickstart_sentiment"}],
        "contract": {"dir": str(REPO / "data_contracts")},
        "sequence_len": 512,
        "lora_target_modules": ["q_proj", "v_proj"],
        "eval": {"labels": ["positive", "negative", "neutral"]},
    }


def _apply(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def write_case(case: BadConfig, directory: Path, base_model: Path, data: Path = QUICKSTART_DATA) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for relative, text in case.files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    path = directory / f"{case.name}.yaml"
    if case.raw is not None:
        path.write_text(case.raw)
        return path
    raw = _base_raw(base_model, data)
    for dotted, value in case.set.items():
        if dotted == "contract.dir" or (dotted == "deepspeed" and case.files):
            value = str(directory / value)
        _apply(raw, dotted, value)
    path.write_text(yaml.safe_dump(raw))
    return path


def write_valid_config(directory: Path, base_model: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "valid.yaml"
    path.write_text(yaml.safe_dump(_base_raw(base_model, QUICKSTART_DATA)))
    return path


@dataclass
class CaseOutcome:
    name: str
    caught: bool
    seconds: float
    message: str
    why_not: str = ""


def check_case(case: BadConfig, directory: Path, base_model: Path, max_seconds: float = 5.0) -> CaseOutcome:
    """Loads and preflights one case in-process (as `loraflow validate` does)."""
    from tasks.config import ConfigError
    from tasks.config_load import load_config
    from tasks.preflight import preflight

    path = write_case(case, directory, base_model)
    started = time.monotonic()
    try:
        preflight(load_config(path), path)
    except ConfigError as error:
        message, caught, why_not = str(error), True, ""
    else:
        message, caught, why_not = "", False, "no ConfigError: the config passed preflight"
    seconds = time.monotonic() - started
    if caught:
        missing = [text for text in case.expect if text not in message]
        leaked = [text for text in case.must_not_contain if text in message]
        if missing or leaked or seconds > max_seconds:
            caught = False
            why_not = f"missing {missing}, leaked {leaked}, {seconds:.1f} s"
    return CaseOutcome(case.name, caught, seconds, message, why_not)
