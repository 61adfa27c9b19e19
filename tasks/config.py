"""The run configuration: one typed object (`RunConfig`), loaded from an Axolotl-style YAML file by
`tasks/config_load.py`, its sections defined in `tasks/config_sections.py`.

Keys follow Axolotl's names so that an existing Axolotl config runs with few or no edits;
loraflow's own sections (`contract`, `eval`, `export`, `schedule`) are additions. Unknown keys are
an error with a did-you-mean, because a misspelled key silently falling back to its default is the
costliest kind of config bug: it is found hours later, in the metrics.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from tasks.axolotl_keys import AXOLOTL_ONLY_TEMPLATES, CHAT_TEMPLATE_NAMES, OPTIMIZERS
from tasks.errors import ConfigFamilyError


class ConfigError(ConfigFamilyError):
    """A config that cannot run; the message names the file, the setting and the fix."""


# Multi-node training: every machine runs the same config file; these say which machine this is.
MACHINE_RANK_ENV = "LORAFLOW_MACHINE_RANK"
MAIN_PROCESS_IP_ENV = "LORAFLOW_MAIN_PROCESS_IP"


# The sections, defined in tasks/config_sections.py, are part of this module's interface.
from tasks.config_sections import (  # noqa: E402
    FSDP_OPTIONS,
    ContractSettings,
    DatasetConfig,
    EvalConfig,
    ExportConfig,
    FsdpConfig,
    LoraBlock,
    NotifyConfig,
    RaySettings,
    RetrySettings,
    ScheduleConfig,
    SpecialTokens,
    StrictModel,
    TimeoutSettings,
)


class RunConfig(StrictModel):
    name: str = Field("run", description="Names flow runs and artifacts; defaults to the config file's name.")
    # model
    base_model: str = Field(
        description="Hugging Face hub id (`org/name`, resolved through the local cache first; HF_HUB_OFFLINE honoured) "
        "or a local directory of the base model in Hugging Face format."
    )
    revision_of_model: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of `base_model`; the resolved commit hash keys the stages."
    )
    trust_remote_code: bool = False
    base_model_config: str | None = Field(
        None, description="Where the model's config.json is, when base_model's directory lacks it (default: base_model)."
    )
    # tokenizer
    tokenizer_config: str | None = Field(None, description="Tokenizer to use instead of the base model's (a directory).")
    special_tokens: SpecialTokens | None = Field(None, description="Special tokens to set or add (bos, eos, pad, unk, additional).")
    tokens: list[str] | None = Field(None, description="Plain tokens to add to the tokenizer (embeddings grow and are trained).")
    chat_template: str | None = Field(
        None,
        description="`tokenizer_default` (the tokenizer's own), a named template (chatml, qwen_25, llama3, gemma, mistral_v1), "
        "`jinja` with `chat_template_jinja`, or `tokenizer_default_fallback_<name>`.",
    )
    chat_template_jinja: str | None = Field(None, description="Jinja chat template text (or a path to a .jinja file).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables the chat template reads, e.g. {enable_thinking: false}; fixed into the saved template."
    )
    # data
    datasets: list[DatasetConfig] = Field(min_length=1)
    val_set_size: float = Field(
        0.1, ge=0, description="Fraction (< 1) or number of rows (>= 1) held out for validation."
    )
    sequence_len: int = Field(2048, ge=16)
    sample_packing: bool = True
    excess_length_strategy: Literal["quarantine", "truncate", "split"] = Field(
        "quarantine",
        description="Rows longer than sequence_len: quarantine them, cut them to sequence_len, or split them into "
        "fragments that are all trained (`completion` rows, chats whose last answer is too long; see tasks/fragments.py).",
    )
    fragment_str: str | None = Field(
        None, description="With `split`: end fragments at this string when one lies in range, e.g. \"\\n\\n\" (paragraphs)."
    )
    max_fragment_len: int | None = Field(
        None, ge=1, description="With `split`: most tokens of a fragment's piece of the document (default: what sequence_len allows)."
    )
    fragment_overlap: int = Field(
        0, ge=0, description="With `split`: tokens before each fragment repeated as context (sliding window), not trained again."
    )
    combine_fragment: bool = Field(
        False, description="With `split`: join consecutive fragments of one document into one sample while it fits sequence_len."
    )

    @model_validator(mode="after")
    def _fragment_settings_need_split(self) -> RunConfig:
        """Fragment settings change nothing unless rows are split: a config that sets them without
        `split` was probably meant to split."""
        if self.excess_length_strategy != "split":
            # Set to something else than the default: a dumped and reloaded config carries every default.
            given = [name for name in ("fragment_str", "max_fragment_len", "fragment_overlap", "combine_fragment")
                     if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default]
            if given:
                raise ValueError(f"{', '.join(f'`{name}`' for name in given)} only apply with `excess_length_strategy: split`")
        limit = min(self.max_fragment_len or self.sequence_len, self.sequence_len)
        if self.fragment_overlap >= limit:
            raise ValueError(f"`fragment_overlap` ({self.fragment_overlap}) must be below the fragment length ({limit} tokens)")
        return self
    train_on_inputs: bool = Field(False, description="Train on every token, prompts included.")
    dataset_exact_deduplication: bool = Field(False, description="Drop exact duplicate rows (recorded in quarantine).")
    dataset_max_rows: int | None = Field(
        None, ge=1, description="Read only the first N rows of each source (`loraflow run --smoke` sets it: a quick first try)."
    )
    dataset_processes: int | None = Field(
        None, ge=1, description="Processes that tokenize prep's new chunks of rows (default: every core); changes no output."
    )
    # adapter
    adapter: Literal["lora", "qlora"] = "lora"
    load_in_4bit: bool = False
    load_in_8bit: bool = Field(False, description="LoRA on 8-bit (bitsandbytes LLM.int8) base weights; needs a CUDA GPU.")
    lora_model_dir: str | None = Field(
        None, description="Start from this trained adapter (warm start); its own LoRA settings (r, alpha, targets) apply."
    )
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names, or `all-linear`.",
    )
    lora_modules_to_save: list[str] | None = None
    lora_target_parameters: list[str] | None = Field(
        None, description="Parameters (not modules) to adapt, e.g. MoE experts' fused `mlp.experts.gate_up_proj` (peft target_parameters)."
    )
    peft_use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Values set on the model's config before loading, e.g. {output_router_logits: true} (`model_config`)."
    )
    lora_config: LoraBlock | None = Field(None, description="Nested PEFT-style alias block.")
    # optimisation
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = Field("cosine", description="transformers' schedulers that need no extra arguments.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adamw_torch",
        description="A transformers optimizer name (Axolotl's spellings too); the bitsandbytes (8-bit, paged, lion) "
        "and torchao ones need a CUDA GPU.",
    )
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="AdamW beta1 (default 0.9).")
    adam_beta2: float | None = Field(None, ge=0, lt=1, description="AdamW beta2 (default 0.999).")
    adam_epsilon: float | None = Field(None, gt=0, description="AdamW epsilon (default 1e-8).")
    optim_args: str | dict[str, Any] | None = Field(
        None, description="Extra optimizer arguments, as transformers' `optim_args` (`key=value,...` or a mapping)."
    )
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    # precision and kernels
    bf16: bool = False
    tf32: bool = False
    flash_attention: bool = Field(
        False, description="flash-attn varlen kernels (GPU, bf16); same as `attn_implementation: flash_attention_2`."
    )
    attn_implementation: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = Field(
        "auto",
        description="`auto`: flash-attn when installed on a GPU with bf16, else flex attention on a GPU, SDPA on a CPU. "
        "Every choice keeps packed samples apart (block-diagonal attention from position_ids).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (non-reentrant).")
    torch_compile: bool = Field(
        False, description="torch.compile the model (GPU: +71% tokens/s on 8B QLoRA with flex attention, benchmarks/RESULTS.md)."
    )
    liger_kernel: bool = Field(
        False, description="Liger kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy): less GPU memory; needs liger-kernel."
    )
    # processes
    ddp_timeout: int = Field(
        600, ge=1, description="Seconds a collective operation may wait for the other processes (PyTorch's default is 1800)."
    )
    num_processes: int | None = Field(
        None, ge=1,
        description="Training processes on all machines together (accelerate's meaning), started with `accelerate launch` "
        "when more than one; default: one per visible GPU on each machine. micro_batch_size is per process. On a GPU host "
        "the job holds that many GPUs per machine, waiting while other jobs hold them. On a CPU, several processes train "
        "with DDP over gloo.",
    )
    num_machines: int = Field(
        1, ge=1, description="Machines that train together (accelerate's `num_machines`); each runs the same config with its "
        "own `machine_rank`, on a state_dir all of them share (deployments/README.md).",
    )
    machine_rank: int = Field(
        default_factory=lambda: int(os.environ.get(MACHINE_RANK_ENV) or 0), ge=0,
        description=f"This machine's rank, 0 to num_machines - 1 (default: ${MACHINE_RANK_ENV}, else 0). Machine 0 "
        "publishes the adapter and runs eval and export; the others join its training.",
    )
    main_process_ip: str | None = Field(
        default_factory=lambda: os.environ.get(MAIN_PROCESS_IP_ENV) or None,
        description=f"Address of machine 0, which the others connect to (default: ${MAIN_PROCESS_IP_ENV}); "
        "needed when num_machines > 1.",
    )
    main_process_port: int | None = Field(
        None, ge=1, le=65535, description="Port machine 0 listens on for the others (default: a free port on one machine, "
        "29500 across machines).",
    )
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config (ZeRO-2/3); its `auto` values are filled from this config. Needs GPUs."
    )
    fsdp: list[FSDP_OPTIONS] | None = Field(
        None, description="FSDP, as Axolotl writes it: [full_shard, auto_wrap] (or shard_grad_op, offload). Needs GPUs."
    )
    fsdp_config: FsdpConfig | None = Field(None, description="FSDP details; setting it switches FSDP on like `fsdp`.")
    # checkpoints and logging
    save_steps: int | float | None = Field(
        None, gt=0, description="Checkpoint every N steps; below 1, a fraction of the planned steps (`saves_per_epoch`)."
    )
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | float | None = Field(
        None, gt=0, description="Score the val split every N steps; below 1, a fraction of the planned steps (`evals_per_epoch`)."
    )
    logging_steps: int = Field(10, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Trainer integrations to report to, those installed; `none` or [] for none. Each reads its own "
        "environment (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...).",
    )
    tracking_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment the report_to integrations read (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...); "
        "filled from Axolotl's wandb_* / mlflow_* keys.",
    )
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
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    notify: NotifyConfig | None = Field(None, description="Alerts on failed / not promoted / promoted / budget events.")
    ray: RaySettings | None = Field(None, description="Run the stages on a Ray cluster (`loraflow run --ray ADDRESS` sets it).")

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

    @model_validator(mode="before")
    @classmethod
    def _report_to_as_list(cls, data: Any) -> Any:
        """`report_to: wandb` and `report_to: none` are accepted as in transformers."""
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            data = {**data, "report_to": [] if data["report_to"] == "none" else [data["report_to"]]}
        return data

    @model_validator(mode="after")
    def _fsdp_options_into_config(self) -> RunConfig:
        """`fsdp: [...]` and `fsdp_config:` become one FsdpConfig (None: no FSDP)."""
        if self.fsdp is None:
            return self
        if "full_shard" in self.fsdp and "shard_grad_op" in self.fsdp:
            raise ValueError("`fsdp`: choose one of full_shard and shard_grad_op")
        # As transformers reads them: `auto_wrap` is the default policy already.
        settings = self.fsdp_config or FsdpConfig()
        if "shard_grad_op" in self.fsdp:
            settings.reshard_after_forward = False
        if "offload" in self.fsdp:
            settings.cpu_offload = True
        self.fsdp_config, self.fsdp = settings, None
        return self

    @model_validator(mode="after")
    def _one_distribution_strategy(self) -> RunConfig:
        if self.deepspeed and self.fsdp_config is not None:
            raise ValueError("`deepspeed` and `fsdp` both shard the model; keep one of them")
        return self

    # What loading said about Axolotl keys (one line each), and whether `bf16` was `auto`.
    _notes: list[str] = PrivateAttr(default_factory=list)
    _precision_auto: bool = PrivateAttr(False)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @property
    def precision_was_auto(self) -> bool:
        return self._precision_auto

    @model_validator(mode="after")
    def _one_quantization(self) -> RunConfig:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("`load_in_8bit` and 4-bit loading (`adapter: qlora` / `load_in_4bit`) exclude each other; keep one")
        return self

    @model_validator(mode="after")
    def _known_chat_template(self) -> RunConfig:
        """Axolotl's rules: `jinja` needs `chat_template_jinja`; a jinja text alone means `jinja`."""
        if self.chat_template_jinja and self.chat_template is None:
            self.chat_template = "jinja"
        name = self.chat_template
        if name is None:
            return self
        fallback = name.removeprefix("tokenizer_default_fallback_")
        if name in AXOLOTL_ONLY_TEMPLATES or fallback in AXOLOTL_ONLY_TEMPLATES:
            raise ValueError(
                f"`chat_template: {name}` is a known Axolotl template but loraflow does not carry it; use "
                f"`tokenizer_default` (the model's own), one of {', '.join(CHAT_TEMPLATE_NAMES[2:])}, or `jinja` with its text"
            )
        if name not in CHAT_TEMPLATE_NAMES and fallback not in CHAT_TEMPLATE_NAMES[2:]:
            raise ValueError(
                f"`chat_template: {name}` is not a template name; use tokenizer_default, jinja, "
                f"{', '.join(CHAT_TEMPLATE_NAMES[2:])} or tokenizer_default_fallback_<name>"
            )
        if name == "jinja" and not self.chat_template_jinja:
            raise ValueError("`chat_template: jinja` needs the template text in `chat_template_jinja`")
        return self

    @model_validator(mode="after")
    def _one_attention_choice(self) -> RunConfig:
        if self.flash_attention and self.attn_implementation not in ("auto", "flash_attention_2"):
            raise ValueError(
                f"`flash_attention: true` contradicts `attn_implementation: {self.attn_implementation}`; keep one of them"
            )
        return self


# Which settings decide which stage's output. A setting listed nowhere would be ignored by every
# fingerprint, so a test checks that each field is listed exactly once.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "prep": (
        "datasets", "val_set_size", "sequence_len", "sample_packing", "excess_length_strategy", "train_on_inputs",
        "fragment_str", "max_fragment_len", "fragment_overlap", "combine_fragment", "dataset_exact_deduplication",
        "contract", "seed", "special_tokens", "tokens", "dataset_max_rows",
        "chat_template", "chat_template_jinja", "chat_template_kwargs",
    ),
    "train": (
        "trust_remote_code", "adapter", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout",
        "lora_target_modules", "lora_modules_to_save", "lora_config", "lora_target_parameters", "peft_use_rslora",
        "overrides_of_model_config", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args", "micro_batch_size",
        "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate", "lr_scheduler",
        "warmup_ratio", "warmup_steps", "optimizer", "weight_decay", "max_grad_norm", "bf16",
        "tf32", "flash_attention", "attn_implementation", "gradient_checkpointing", "torch_compile", "liger_kernel",
        "num_processes", "num_machines", "deepspeed", "fsdp", "fsdp_config", "save_steps", "save_total_limit", "eval_steps",
        "logging_steps",
    ),
    "eval": ("eval",),
    "export": ("export", "hub_model_id"),
    # Where outputs go and when runs start never changes what a stage computes.
    # Models, tokenizers and adapters are locations (or hub ids), as base_model is: the stage keys hash
    # what they resolve to (tasks/stages.py), never the string.
    "none": ("name", "base_model", "revision_of_model", "base_model_config", "tokenizer_config", "lora_model_dir",
             "output_dir", "state_dir", "schedule", "timeouts", "ddp_timeout", "machine_rank", "main_process_ip", "main_process_port",
             "retries", "report_to", "tracking_env", "notify", "dataset_processes", "ray"),
}


def stage_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the config that decides one stage's output, as plain JSON-able data."""
    # Locations are left out: moving the data, the contracts or the DeepSpeed JSON must not invalidate a
    # stage (the train fingerprint hashes that file's content instead).
    dumped = cfg.model_dump(
        mode="json", exclude={"datasets": {"__all__": {"path"}}, "contract": {"dir"}, "deepspeed": True, "eval": {"test_set": {"path"}}}
    )
    return {name: dumped[name] for name in STAGE_FIELDS[stage] if name in dumped}
