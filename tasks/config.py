"""The run configuration: one typed object, loaded from an Axolotl-style YAML file.

Keys follow Axolotl's names so that an existing Axolotl config runs with few or no edits;
loraflow's own sections (`contract`, `eval`, `export`, `schedule`) are additions. Unknown keys are
an error with a did-you-mean, because a misspelled key silently falling back to its default is the
costliest kind of config bug: it is found hours later, in the metrics.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, the setting and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


# Axolotl keys we recognise but do not implement: naming them is kinder than "unknown key".
UNSUPPORTED_AXOLOTL_KEYS = {
    "deepspeed": "DeepSpeed launch is not supported yet; remove `deepspeed` to train on one device",
    "fsdp": "FSDP is not supported yet; remove `fsdp` to train on one device",
    "fsdp_config": "FSDP is not supported yet; remove `fsdp_config`",
    "load_in_8bit": "8-bit loading is not supported; use `adapter: qlora` (4-bit nf4) or plain `lora`",
    "rl": "preference tuning (`rl`) is not supported; loraflow does supervised fine-tuning",
    "special_tokens": "adding special tokens is not supported; the base tokenizer is used as is",
    "chat_template": "custom chat templates are not supported yet; the tokenizer's template is used",
    "dataset_prepared_path": "prep outputs live in `state_dir`; remove `dataset_prepared_path`",
    "wandb_project": "use `report_to` once it is supported; remove `wandb_project`",
}


class DatasetConfig(StrictModel):
    """One data source. `type` says how its rows become messages."""

    path: str = Field(description="Local file (JSONL) with one conversation per row.")
    type: Literal["chat_template", "chatml"] = Field(
        "chat_template", description="Row format; `chatml` is an alias of `chat_template`."
    )
    field_messages: str = Field("messages", description="Column holding the list of messages.")
    contract: str | None = Field(
        None, description="Name of the data contract in `contract.dir` to validate this source with."
    )


class ContractSettings(StrictModel):
    dir: str = Field("data_contracts", description="Directory holding the contract YAML files.")
    max_rejected_fraction: float = Field(
        0.0, ge=0, le=1, description="Fail prep when more than this fraction of rows is quarantined."
    )


class EvalConfig(StrictModel):
    endpoint: Literal["local", "external"] = Field(
        "local", description="`local` starts `transformers serve`; `external` uses `base_url`."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible base URL for `external`.")
    model: str | None = Field(None, description="Model name to request from an external endpoint.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (never the key itself)."
    )
    max_samples: int = Field(200, ge=1, description="Evaluate at most this many val rows.")
    max_tokens: int = Field(16, ge=1, description="Completion length limit per request.")
    temperature: float = Field(0.0, ge=0)
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    request_timeout: float = Field(60.0, gt=0, description="Seconds before a request is retried.")
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx, timeouts, lost connections.")
    startup_timeout: float = Field(180.0, gt=0, description="Seconds to wait for the local server.")
    compare_base: bool = Field(True, description="Also score the base model the same way.")
    labels: list[str] | None = Field(
        None, description="Closed label set; enables `accuracy` (the one label a reply names)."
    )


class ExportConfig(StrictModel):
    merge_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merged weights."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    verify_prompts: int = Field(8, ge=1, description="Val prompts used to verify the merge.")


class ScheduleConfig(StrictModel):
    cron: str = Field("0 2 * * *", description="Nightly schedule of the deployment.")
    timezone: str = Field("UTC")


class RetrySettings(StrictModel):
    """How often Prefect retries a failed stage before the run fails."""

    prep: int = Field(0, ge=0)
    train: int = Field(0, ge=0, description="Training resumes from its last checkpoint on a retry.")
    eval: int = Field(1, ge=0, description="Eval depends on a server; transient failures are common.")
    export: int = Field(0, ge=0)
    delay_seconds: float = Field(10.0, ge=0)


class LoraBlock(StrictModel):
    """PEFT-style nested `lora_config:`, accepted as an alias of the flat `lora_*` keys."""

    r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None


class RunConfig(StrictModel):
    name: str = Field("run", description="Names flow runs and artifacts; defaults to the config file's name.")
    # model
    base_model: str = Field(description="Local directory of the base model in Hugging Face format.")
    trust_remote_code: bool = False
    # data
    datasets: list[DatasetConfig] = Field(min_length=1)
    val_set_size: float = Field(
        0.1, ge=0, description="Fraction (< 1) or number of rows (>= 1) held out for validation."
    )
    sequence_len: int = Field(2048, ge=16)
    sample_packing: bool = True
    # adapter
    adapter: Literal["lora", "qlora"] = "lora"
    load_in_4bit: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names, or `all-linear`.",
    )
    lora_modules_to_save: list[str] | None = None
    lora_config: LoraBlock | None = Field(None, description="Nested PEFT-style alias block.")
    # optimisation
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    # precision and kernels
    bf16: bool = False
    tf32: bool = False
    flash_attention: bool = False
    gradient_checkpointing: bool = False
    # checkpoints and logging
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    # where things go
    output_dir: str = Field("outputs/run", description="Run summary and the exported model.")
    state_dir: str = Field(".loraflow/state", description="Content-addressed stage outputs.")
    hub_model_id: str | None = None
    # loraflow sections
    contract: ContractSettings = Field(default_factory=ContractSettings)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    retries: RetrySettings = Field(default_factory=RetrySettings)

    @model_validator(mode="after")
    def _apply_lora_block(self) -> RunConfig:
        """Fold `lora_config:` into the flat keys so the rest of the code reads one place."""
        block = self.lora_config
        if block is not None:
            aliases = {
                "r": "lora_r",
                "lora_alpha": "lora_alpha",
                "lora_dropout": "lora_dropout",
                "target_modules": "lora_target_modules",
                "modules_to_save": "lora_modules_to_save",
            }
            for block_key, flat_key in aliases.items():
                value = getattr(block, block_key)
                if value is not None:
                    setattr(self, flat_key, value)
            self.lora_config = None
        if self.adapter == "qlora":
            self.load_in_4bit = True
        return self


# Which settings decide which stage's output. A setting listed nowhere would be ignored by every
# fingerprint, so a test checks that each field is listed exactly once.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "prep": ("datasets", "val_set_size", "sequence_len", "sample_packing", "contract", "seed"),
    "train": (
        "trust_remote_code", "adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout",
        "lora_target_modules", "lora_modules_to_save", "lora_config", "micro_batch_size",
        "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate", "lr_scheduler",
        "warmup_ratio", "warmup_steps", "optimizer", "weight_decay", "max_grad_norm", "bf16",
        "tf32", "flash_attention", "gradient_checkpointing", "save_steps", "save_total_limit",
        "eval_steps", "logging_steps",
    ),
    "eval": ("eval",),
    "export": ("export", "hub_model_id"),
    # Where outputs go and when runs start never changes what a stage computes.
    "none": ("name", "base_model", "output_dir", "state_dir", "schedule", "retries"),
}


def stage_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the config that decides one stage's output, as plain JSON-able data."""
    # Locations are left out: moving the data or the contracts must not invalidate a stage.
    dumped = cfg.model_dump(mode="json", exclude={"datasets": {"__all__": {"path"}}, "contract": {"dir"}})
    return {name: dumped[name] for name in STAGE_FIELDS[stage]}


def load_config(path: str | Path) -> RunConfig:
    """Reads and validates a YAML config; every problem is reported at once, as a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw.setdefault("name", path.stem)
    raw, unsupported = _take_unsupported_keys(raw)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(path, error, unsupported)) from None
    if unsupported:
        raise ConfigError("\n".join([f"{path}: {len(unsupported)} problem(s) in the config", *unsupported]))
    return cfg


def _take_unsupported_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drops known-but-unsupported Axolotl keys; the ones actually switched on are problems.
    Axolotl example configs often carry `load_in_8bit: false` and the like, which must load."""
    problems = [
        f"  - `{key}` is a known Axolotl setting but {reason}"
        for key, reason in UNSUPPORTED_AXOLOTL_KEYS.items()
        if raw.get(key) not in (None, False, "", [], {})
    ]
    return {key: value for key, value in raw.items() if key not in UNSUPPORTED_AXOLOTL_KEYS}, problems


def format_validation_error(path: Path, error: ValidationError, other_problems: list[str] = ()) -> str:
    lines = [f"{path}: {error.error_count() + len(other_problems)} problem(s) in the config", *other_problems]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"  - unknown key `{location}`{_did_you_mean(problem['loc'])}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
            lines.append(f"  - `{location}`: {message}{shown}" if location else f"  - {message}")
    return "\n".join(lines)


def _did_you_mean(location: tuple[Any, ...]) -> str:
    known = sorted(_fields_of_parent(location))
    matches = difflib.get_close_matches(str(location[-1]), known, n=1, cutoff=0.6)
    if matches:
        return f": did you mean `{matches[0]}`?"
    return f"; known keys here: {', '.join(known)}" if len(known) <= 12 else ""


def _fields_of_parent(location: tuple[Any, ...]) -> set[str]:
    """Field names of the model that holds the key at `location` (walking nested sections)."""
    model: type[BaseModel] = RunConfig
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        nested = _model_in(field.annotation) if field else None
        if nested is None:
            return set()
        model = nested
    return set(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, Union, types.UnionType):
        for argument in typing.get_args(annotation):
            found = _model_in(argument)
            if found is not None:
                return found
    return None
