"""The run configuration: one typed object, loaded from an Axolotl-style YAML file.

Keys follow Axolotl's names so that an existing Axolotl config runs with few or no edits;
loraflow's own sections (`contract`, `eval`, `export`, `schedule`) are additions. Unknown keys are
an error with a did-you-mean, because a misspelled key silently falling back to its default is the
costliest kind of config bug: it is found hours later, in the metrics.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tasks.axolotl_keys import AXOLOTL_ONLY_TEMPLATES, CHAT_TEMPLATE_NAMES, OPTIMIZERS, documented_keys, translate
from tasks.errors import ConfigFamilyError


class ConfigError(ConfigFamilyError):
    """A config that cannot run; the message names the file, the setting and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


# Axolotl's keys that are not fields here (translated, accepted with a notice, or refused with the
# reason) live in tasks/axolotl_keys.py; `load_config` applies them before validation.


class DatasetConfig(StrictModel):
    """One data source. `type` says how its rows become messages (Axolotl's names and keys)."""

    path: str = Field(
        description="JSONL (.gz/.zst too), JSON, Parquet or CSV file, or a directory saved by `datasets`."
    )
    type: Literal["chat_template", "chatml", "alpaca", "sharegpt", "completion", "input_output"] = Field(
        "chat_template", description="Row format; `chatml` is an alias of `chat_template`."
    )
    ds_type: Literal["json", "parquet", "csv", "arrow"] | None = Field(
        None, description="File format; inferred from the file name when unset."
    )
    split: str = Field("train", description="Split to read from a `datasets` directory holding several.")
    name: str | None = Field(None, description="Configuration name of a hub dataset (as `datasets.load_dataset`).")
    data_files: list[str] | str | None = Field(None, description="Files to read from a hub dataset (as `datasets.load_dataset`).")
    # chat_template / sharegpt
    field_messages: str = Field("messages", description="Column holding the list of messages.")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="Keys of role and content inside each message, e.g. {role: from, content: value}.",
    )
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"], description="Roles whose turns are trained.")
    drop_system_message: bool = Field(False, description="Drop a leading system turn (templates without a system role).")
    train_on_eos: Literal["turn", "last", "all", "none"] = Field(
        "turn", description="Which end-of-turn tokens are trained: after each trained turn, the last one, all, none."
    )
    # alpaca
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    field_system: str = Field("system", description="Optional column with a system prompt (alpaca).")
    # completion
    field: str = Field("text", description="Column holding raw text (completion).")
    # input_output
    field_segments: str = Field("segments", description="Column holding [{text, train}] segments (input_output).")
    contract: str | None = Field(
        None, description="Name of the data contract in `contract.dir` to validate this source with."
    )


class ContractSettings(StrictModel):
    dir: str = Field("data_contracts", description="Directory holding the contract YAML files.")
    max_rejected_fraction: float = Field(
        0.0, ge=0, le=1, description="Fail prep when more than this fraction of rows is quarantined."
    )


class EvalConfig(StrictModel):
    """How the tuned (and base) model are asked and scored; see `tasks/eval.py`."""

    class Normalisation(StrictModel):
        """Applied to answers and references before exact match, accuracy and ROUGE-L."""

        lowercase: bool = True
        collapse_whitespace: bool = True
        strip_punctuation: bool = Field(True, description="Strip punctuation and quotes around the text.")

    class Price(StrictModel):
        input_per_million: float = Field(0.0, ge=0, description="USD per million input (prompt) tokens.")
        output_per_million: float = Field(0.0, ge=0, description="USD per million output (completion) tokens.")

    class Judge(StrictModel):
        """An LLM judge (any OpenAI-compatible model) comparing tuned and base answers pairwise."""

        base_url: str = Field(description="OpenAI-compatible base URL of the judge.")
        model: str = Field(description="Judge model name, e.g. `deepseek-chat`.")
        api_key_env: str | None = Field(None, description="Environment variable holding the judge's API key.")
        api_key_secret: str | None = Field(None, description="Prefect Secret block holding the judge's API key.")
        rubric: str = Field(
            "Which answer responds to the conversation better: correct, complete, concise? "
            "Use the reference answer as the ground truth.",
            description="What the judge is asked to weigh.",
        )
        max_tokens: int = Field(8, ge=1, description="Completion length limit of a verdict.")

        @model_validator(mode="before")
        @classmethod
        def _key_names_only(cls, data: Any) -> Any:
            return cls.check_key_settings(data, "eval.judge")

        @staticmethod
        def check_key_settings(data: Any, section: str) -> Any:
            """API keys are named, never written in the config. Checked on the whole section so that a
            key pasted by mistake is never echoed in the error (the error printer shows scalar inputs)."""
            if isinstance(data, dict):
                if data.get("api_key_env") and data.get("api_key_secret"):
                    raise ValueError(f"`{section}`: set one of `api_key_env` and `api_key_secret`, not both")
                name = data.get("api_key_env")
                if name is not None and not (str(name).isascii() and str(name).isidentifier()):
                    raise ValueError(
                        f"`{section}.api_key_env` must be the NAME of an environment variable holding the key "
                        "(e.g. DEEPSEEK_API_KEY), never the key itself"
                    )
            return data

    endpoint: Literal["local", "vllm", "external"] = Field(
        "local",
        description="`local` starts `transformers serve`; `vllm` starts vLLM with the LoRA adapter (GPU); "
        "`external` uses `base_url`.",
    )
    base_url: str | None = Field(None, description="OpenAI-compatible base URL for `external`.")
    model: str | None = Field(None, description="Model name to request from an external endpoint.")
    base_model_name: str | None = Field(
        None, description="Name of the base model at the external endpoint, to compare against (optional)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (never the key itself)."
    )
    api_key_secret: str | None = Field(
        None, description="Prefect Secret block holding the API key (instead of `api_key_env`)."
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
    normalisation: Normalisation = Field(default_factory=Normalisation)
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="USD per million tokens, by model name (external/judge) or role (`tuned`, `base`); unlisted cost 0.",
    )
    judge: Judge | None = Field(None, description="Optional LLM judge for a pairwise base-vs-tuned win rate.")
    test_set: DatasetConfig | None = Field(
        None,
        description="A pinned held-out file (a dataset: path, type, field mappings, its own `contract`) scored in full by "
        "every run and used by the promotion gate; rows of it found in the training data are dropped from training.",
    )
    budget_usd: float | None = Field(
        None, gt=0, description="Stop eval before it spends more than this on API requests in one run (cached answers are free).",
    )

    @model_validator(mode="before")
    @classmethod
    def _key_names_only(cls, data: Any) -> Any:
        return EvalConfig.Judge.check_key_settings(data, "eval")

    @model_validator(mode="after")
    def _judge_needs_base(self) -> EvalConfig:
        if self.judge is not None and not self.compare_base:
            raise ValueError("`eval.judge` compares the tuned model with the base model: set `eval.compare_base: true`")
        return self


class PromoteCondition(StrictModel):
    """One condition of `export.promote_if`, on an eval metric of the new version."""

    metric: str = Field(
        description="Eval metric: `accuracy` (a bare name is the tuned model's), `tuned.exact_match`, "
        "`base.accuracy`, `eval_loss`."
    )
    min: float | None = Field(None, description="Promote only if the metric is at least this.")
    max: float | None = Field(None, description="Promote only if the metric is at most this.")
    max_regression: float | None = Field(
        None, ge=0, description="Promote only if the metric is at most this much worse than the production version's."
    )
    higher_is_better: bool = Field(True, description="False for losses: a regression is then an increase.")
    min_improvement: float | None = Field(
        None, ge=0,
        description="Promote only if the metric beats production's on the same items by more than this (0: any improvement); "
        "with `confidence`, the whole interval of the difference must lie above it.",
    )
    confidence: float | None = Field(
        None, gt=0, lt=1,
        description="Decide `min_improvement` / `max_regression` with a paired test at this confidence (e.g. 0.95) instead "
        "of on the bare difference: a regression then blocks only when significantly beyond `max_regression`.",
    )
    test: Literal["auto", "mcnemar", "bootstrap"] = Field(
        "auto", description="Paired test: exact McNemar for 0/1 scores (accuracy, exact match), else a paired bootstrap.",
    )

    @model_validator(mode="after")
    def _has_a_bound(self) -> PromoteCondition:
        if self.min is None and self.max is None and self.max_regression is None and self.min_improvement is None:
            raise ValueError(f"promote_if condition on `{self.metric}` needs `min`, `max`, `max_regression` or `min_improvement`")
        if self.confidence is not None and self.max_regression is None and self.min_improvement is None:
            raise ValueError(f"promote_if condition on `{self.metric}`: `confidence` applies to `max_regression` or `min_improvement`")
        return self


class ExportConfig(StrictModel):
    merge_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merged weights; `fp32`, `bf16`, `fp16` are accepted too."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    verify_prompts: int = Field(8, ge=1, description="Val prompts used to verify the merge.")
    verify_max_new_tokens: int = Field(
        16, ge=1, description="Greedy tokens generated per verify prompt; merged and adapter model must agree on all."
    )
    adapter_only: bool = Field(
        False, description="Export only the adapter in PEFT format (PeftModel.from_pretrained, vLLM --lora-modules)."
    )
    gguf: bool = Field(False, description="Also write a GGUF file with llama.cpp's converter, when it is available.")
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="GGUF weight type.")
    gguf_converter: str | None = Field(
        None, description="Path to llama.cpp's convert_hf_to_gguf.py; default: $LLAMA_CPP_DIR or the PATH."
    )
    registry_dir: str | None = Field(
        None, description="Model registry of this run's versions; default: `<state_dir>/../registry/<name>`."
    )
    promote_if: list[PromoteCondition] = Field(
        default_factory=list, description="Conditions on eval metrics for a new version to become production (none: always)."
    )
    hub_private: bool = Field(True, description="Create the `hub_model_id` repo as private.")
    hub_token_env: str = Field("HF_TOKEN", description="Environment variable holding the hub token (never the token).")

    @model_validator(mode="before")
    @classmethod
    def _dtype_aliases(cls, data: Any) -> Any:
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        if isinstance(data, dict) and data.get("merge_dtype") in aliases:
            data = {**data, "merge_dtype": aliases[data["merge_dtype"]]}
        return data

    @model_validator(mode="after")
    def _gguf_needs_merged_model(self) -> ExportConfig:
        if self.gguf and self.adapter_only:
            raise ValueError("export.gguf converts a merged model: set adapter_only: false, or gguf: false")
        return self


class FsdpConfig(StrictModel):
    """FSDP2 settings handed to the Trainer (transformers' `fsdp_config`). Axolotl's `fsdp_`-prefixed
    names are accepted. Checkpoints and the adapter use full state dicts: LoRA weights are small."""

    version: Literal[2] = Field(2, description="FSDP2 (`fully_shard`); transformers deprecates FSDP1.")
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: list[str] | None = Field(
        None, description="Decoder layer classes to shard one by one, e.g. [LlamaDecoderLayer]; default: the model's own."
    )
    min_num_params: int = Field(0, ge=0, description="Smallest module wrapped by SIZE_BASED_WRAP.")
    reshard_after_forward: bool = Field(
        True, description="Free gathered weights after forward (full_shard); false keeps them until backward (shard_grad_op)."
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters in CPU memory.")
    cpu_ram_efficient_loading: bool = Field(False, description="Load weights on the first process only and broadcast them.")
    activation_checkpointing: bool = Field(False, description="FSDP's own activation checkpointing (instead of gradient_checkpointing).")
    state_dict_type: Literal["FULL_STATE_DICT"] = "FULL_STATE_DICT"

    @model_validator(mode="before")
    @classmethod
    def _axolotl_names(cls, data: Any) -> Any:
        """`fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer`, `fsdp_offload_params`,
        `fsdp_sharding_strategy`, as Axolotl writes them."""
        if not isinstance(data, dict):
            return data
        named = {str(key).removeprefix("fsdp_"): value for key, value in data.items()}
        if "offload_params" in named:
            named["cpu_offload"] = named.pop("offload_params")
        strategy = named.pop("sharding_strategy", None)
        if strategy is not None:
            if str(strategy).upper() not in ("FULL_SHARD", "SHARD_GRAD_OP"):
                raise ValueError(f"`fsdp_config.sharding_strategy` {strategy!r}: FSDP2 supports FULL_SHARD and SHARD_GRAD_OP")
            named.setdefault("reshard_after_forward", str(strategy).upper() == "FULL_SHARD")
        if isinstance(named.get("transformer_layer_cls_to_wrap"), str):
            named["transformer_layer_cls_to_wrap"] = [named["transformer_layer_cls_to_wrap"]]
        return named


# Axolotl's (and transformers') `fsdp:` list options; folded into FsdpConfig.
FSDP_OPTIONS = Literal["full_shard", "shard_grad_op", "offload", "auto_wrap"]


NOTIFY_EVENTS = ("failed", "crashed", "not_promoted", "promoted", "budget_exceeded")


class NotifyConfig(StrictModel):
    """Messages on run events (see `tasks/notify.py`). Secrets stay out of the config: the webhook
    URL can be named by an environment variable, a Prefect notification block by its name."""

    class Webhook(StrictModel):
        url: str | None = Field(None, description="URL that receives an HTTP POST with the JSON body.")
        url_env: str | None = Field(None, description="Environment variable holding the URL (for URLs that carry a token).")
        timeout: float = Field(10.0, gt=0, description="Seconds before the POST is given up (the run goes on).")

        @model_validator(mode="after")
        def _one_url(self) -> NotifyConfig.Webhook:
            if (self.url is None) == (self.url_env is None):
                raise ValueError("`notify.webhook`: set one of `url` and `url_env`")
            return self

    events: list[str] = Field(
        default_factory=lambda: ["failed", "not_promoted", "budget_exceeded"],
        description="Events that send a message: failed, crashed (sent by the Prefect server: needs PREFECT_API_URL, "
        "see tasks/zombies.py), not_promoted, promoted, budget_exceeded.",
    )
    webhook: Webhook | None = Field(None, description="A plain webhook: HTTP POST of the JSON body.")
    block: str | None = Field(None, description="Name of a saved Prefect notification block (Slack, email, ...).")

    @model_validator(mode="after")
    def _known_events(self) -> NotifyConfig:
        for event in self.events:
            if event not in NOTIFY_EVENTS:
                raise ValueError(f"`notify.events`: unknown event {event!r}; choose among {', '.join(NOTIFY_EVENTS)}")
        return self


class ScheduleConfig(StrictModel):
    cron: str = Field("0 2 * * *", description="Nightly schedule of the deployment.")
    timezone: str = Field("UTC")


class TimeoutSettings(StrictModel):
    """How long each stage may run before it fails (seconds; unset: no limit). A hung collective or
    a stalled server then ends the run, with an error naming the setting, instead of a run that
    stays Running forever."""

    prep: float | None = Field(None, gt=0)
    train: float | None = Field(None, gt=0)
    eval: float | None = Field(None, gt=0)
    export: float | None = Field(None, gt=0)


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
    # PEFT's own keys, accepted with the only values loraflow trains with.
    bias: Literal["none"] | None = Field(None, description="Only `none`: LoRA trains no bias terms here.")
    task_type: Literal["CAUSAL_LM"] | None = Field(None, description="Only `CAUSAL_LM`.")


class SpecialTokens(StrictModel):
    """Axolotl's `special_tokens`: set (or add) the tokenizer's special tokens. A token the tokenizer
    lacks is added, the embeddings grow to fit, and the new rows are trained (embed_tokens and
    lm_head join lora_modules_to_save)."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


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
        description="Training processes, started with `accelerate launch` when more than one; default: one per visible GPU. "
        "micro_batch_size is per process. On a CPU, several processes train with DDP over gloo.",
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
        "num_processes", "deepspeed", "fsdp", "fsdp_config", "save_steps", "save_total_limit", "eval_steps", "logging_steps",
    ),
    "eval": ("eval",),
    "export": ("export", "hub_model_id"),
    # Where outputs go and when runs start never changes what a stage computes.
    # Models, tokenizers and adapters are locations (or hub ids), as base_model is: the stage keys hash
    # what they resolve to (tasks/stages.py), never the string.
    "none": ("name", "base_model", "revision_of_model", "base_model_config", "tokenizer_config", "lora_model_dir",
             "output_dir", "state_dir", "schedule", "timeouts", "ddp_timeout",
             "retries", "report_to", "tracking_env", "notify"),
}


def stage_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the config that decides one stage's output, as plain JSON-able data."""
    # Locations are left out: moving the data, the contracts or the DeepSpeed JSON must not invalidate a
    # stage (the train fingerprint hashes that file's content instead).
    dumped = cfg.model_dump(
        mode="json", exclude={"datasets": {"__all__": {"path"}}, "contract": {"dir"}, "deepspeed": True, "eval": {"test_set": {"path"}}}
    )
    return {name: dumped[name] for name in STAGE_FIELDS[stage] if name in dumped}


@dataclass
class ConfigReport:
    """What reading a config found: the config (None when it cannot be built), its problems and the
    notes on Axolotl keys. `partial` marks a config built after leaving out the keys in error, so
    that `loraflow validate` can still run the preflight checks on the rest."""

    path: Path
    cfg: RunConfig | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partial: bool = False

    def error_message(self) -> str:
        return "\n".join([f"{self.path}: {len(self.problems)} problem(s) in the config", *(f"  - {p}" for p in self.problems)])


def load_config(path: str | Path) -> RunConfig:
    """Reads and validates a YAML config; every problem is reported at once, as a ConfigError.
    Notes on Axolotl keys that change nothing here are in `cfg.notes`."""
    report = check_config(path)
    if report.problems:
        raise ConfigError(report.error_message())
    assert report.cfg is not None
    return report.cfg


def check_config(path: str | Path) -> ConfigReport:
    """Reads a YAML config with Axolotl's semantics (tasks/axolotl_keys.py) and validates it. A file
    that cannot be read at all raises ConfigError; problems in its settings are returned."""
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
    translation = translate(raw, _gpu_capabilities, frozenset(RunConfig.model_fields), frozenset(DatasetConfig.model_fields))
    report = ConfigReport(path, None, list(translation.problems), list(translation.notes))
    settings = translation.raw
    for attempt in range(4):
        try:
            cfg = RunConfig.model_validate(settings)
        except ValidationError as error:
            if attempt == 0:
                report.problems.extend(describe_validation_errors(error, translation.renamed))
            # Leave out what is in error and try again, so the remaining settings can still be checked.
            settings = _without_error_locations(settings, error)
            if settings is None:
                return report
            report.partial = True
            continue
        cfg._notes = report.notes
        cfg._precision_auto = translation.precision_auto
        report.cfg = cfg
        return report
    return report


def _gpu_capabilities() -> list[float]:
    from tasks.gpus import visible_gpus

    return [gpu.compute_capability for gpu in visible_gpus()]


def _without_error_locations(settings: dict[str, Any], error: ValidationError) -> dict[str, Any] | None:
    """A copy of `settings` without the keys the errors point at; None when an error has no key
    to drop (a required key missing, a rule across several keys)."""
    import copy

    trimmed = copy.deepcopy(settings)
    for problem in error.errors():
        location = problem["loc"]
        if not location or problem["type"] == "missing":
            return None
        node: Any = trimmed
        for part in location[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        if isinstance(node, dict) and location[-1] in node:
            del node[location[-1]]
        else:
            return None
    return trimmed


def format_validation_error(path: Path, error: ValidationError, other_problems: list[str] = ()) -> str:
    problems = [*(p.removeprefix("  - ") for p in other_problems), *describe_validation_errors(error)]
    return ConfigReport(path, None, problems).error_message()


def describe_validation_errors(error: ValidationError, renamed: dict[str, str] | None = None) -> list[str]:
    """One line per error, naming the key as the file writes it."""
    renamed = renamed or {}
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            written = renamed.get(location)
            named = f"`{written}` (read as `{location}`)" if written else f"`{location}`"
            lines.append(f"unknown key {named}{_did_you_mean(problem['loc'])}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
            lines.append(f"`{renamed.get(location, location)}`: {message}{shown}" if location else message)
    return lines


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """A suggestion only for a real typo: a known key at most one edit away (two for long names,
    a swap of neighbours counting as one). Keys of another meaning that merely look alike never
    reach here: every key Axolotl documents is known (tasks/axolotl_keys.py)."""
    known = _fields_of_parent(location)
    if len(location) == 1:
        known |= documented_keys()
    typo = str(location[-1])
    allowed = 1 if len(typo) < 10 else 2
    distance, closest = min(((_edit_distance(typo, name), name) for name in known), default=(allowed + 1, ""))
    if distance <= allowed:
        return f": did you mean `{closest}`?"
    # A name cut short (`api_key` for `api_key_env`): the keys it begins are what was meant.
    extended = sorted(name for name in _fields_of_parent(location) if len(typo) >= 4 and name.startswith(typo))
    if 1 <= len(extended) <= 2:
        return ": did you mean " + " or ".join(f"`{name}`" for name in extended) + "?"
    fields = sorted(_fields_of_parent(location))
    return f"; known keys here: {', '.join(fields)}" if len(fields) <= 12 else ""


def _edit_distance(left: str, right: str) -> int:
    """Levenshtein distance with adjacent swaps counted as one edit (optimal string alignment)."""
    if abs(len(left) - len(right)) > 2:
        return 3
    previous_row: list[int] = []
    row = list(range(len(right) + 1))
    for i, left_char in enumerate(left, start=1):
        before, previous_row, row = previous_row, row, [i] + [0] * len(right)
        for j, right_char in enumerate(right, start=1):
            cost = left_char != right_char
            row[j] = min(previous_row[j] + 1, row[j - 1] + 1, previous_row[j - 1] + cost)
            if i > 1 and j > 1 and left_char == right[j - 2] and left[i - 2] == right_char:
                row[j] = min(row[j], before[j - 2] + 1)
    return row[-1]


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
