"""Checks that fail a run in seconds, before any data or weights are loaded.

Everything here reads only small files (config.json, safetensors headers, contract YAML) and never
imports torch, so `loraflow validate` answers in about a second. All problems are reported at
once, each with the setting to change.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from tasks.config import ConfigError, RunConfig
from tasks.contracts import ContractError, load_contract
from tasks.formats import DatasetError, check_source
from tasks.launch import deepspeed_problems, plan_processes
from tasks.memory import hardware_problems, visible_gpus


def preflight(cfg: RunConfig, config_path: str | Path = "config", *, for_run: bool = True) -> list[str]:
    """Raises ConfigError listing every problem; returns notes on checks that were skipped.

    With `for_run=False` (`loraflow validate`, e.g. of a GPU recipe on a laptop), a missing base
    model or a machine without a GPU skips the checks that need them, with a note, instead of failing.
    """
    problems: list[str] = []
    notes: list[str] = []
    model_config = _read_model_config(cfg, problems if for_run else None)

    for index, dataset in enumerate(cfg.datasets):
        if not Path(dataset.path).exists():
            problems.append(f"`datasets[{index}].path`: {dataset.path} not found")
            continue
        try:
            check_source(dataset)
        except DatasetError as error:
            problems.append(f"`datasets[{index}]`: {error}")
        if dataset.contract:
            try:
                load_contract(Path(cfg.contract.dir), dataset.contract)
            except ContractError as error:
                problems.append(f"`datasets[{index}].contract`: {error}")

    if model_config is not None:
        limit = model_config.get("max_position_embeddings")
        if limit and cfg.sequence_len > limit:
            problems.append(
                f"`sequence_len` {cfg.sequence_len} is above the model's maximum of {limit} "
                f"(max_position_embeddings); set sequence_len <= {limit}"
            )
        missing = _missing_target_modules(cfg)
        if missing:
            problems.append(
                f"`lora_target_modules`: {', '.join(missing)} not found in the model's layers; "
                "use names from the model (e.g. q_proj, v_proj) or `all-linear`"
            )
    else:
        notes.append(
            f"model checks skipped: {cfg.base_model} has no config.json here (sequence_len limit, LoRA targets, memory estimate)"
        )

    gpus = visible_gpus()
    hardware = hardware_problems(cfg, gpus)
    if gpus or for_run:
        problems.extend(hardware)
    elif hardware:
        notes.append("GPU checks skipped: no GPU is visible here, and this config needs one for: " + "; ".join(
            problem.split("`")[1] for problem in hardware
        ))

    if cfg.flash_attention or cfg.attn_implementation == "flash_attention_2":
        if not cfg.bf16:
            problems.append("`flash_attention: true` needs half precision; set `bf16: true` (flash-attn has no fp32 kernels)")
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "`flash_attention: true` but flash-attn is not installed; install the `gpu` extra or set flash_attention: false"
            )
    processes = plan_processes(cfg, gpus).processes
    if cfg.deepspeed:
        problems.extend(deepspeed_problems(cfg, processes))
        if importlib.util.find_spec("deepspeed") is None and (gpus or for_run):
            problems.append("`deepspeed` is set but DeepSpeed is not installed; install the `gpu` extra (or `pip install deepspeed`)")
    if cfg.fsdp_config is not None and processes < 2 and (gpus or for_run):
        problems.append(
            f"`fsdp` shards the model across processes but {processes} will run; use two or more GPUs "
            "(`num_processes`), or drop `fsdp` and save memory with `adapter: qlora` / `gradient_checkpointing: true`"
        )
    if cfg.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        problems.append("`liger_kernel: true` but liger-kernel is not installed; install the `gpu` extra or set liger_kernel: false")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("`adapter: qlora` needs bitsandbytes; `pip install bitsandbytes` or use `adapter: lora`")
    if cfg.eval.endpoint == "external" and not (cfg.eval.base_url and cfg.eval.model):
        problems.append("`eval.endpoint: external` needs `eval.base_url` and `eval.model`")
    key_settings = (("eval.api_key_env", cfg.eval.api_key_env), ("eval.judge.api_key_env", cfg.eval.judge and cfg.eval.judge.api_key_env))
    for setting, env_name in key_settings:
        if env_name and not os.environ.get(env_name):
            problems.append(f"`{setting}` names the environment variable {env_name}, which is not set; export it before running")
    if cfg.eval.endpoint == "vllm":
        from tasks.serving import EndpointUnavailableError, check_vllm_available

        try:
            check_vllm_available()
        except EndpointUnavailableError as error:
            problems.append(str(error))
    if cfg.val_set_size == 0 and cfg.eval.endpoint in ("local", "vllm"):
        problems.append("`val_set_size` is 0, so eval has nothing to score; set it to e.g. 0.05")

    if problems:
        raise ConfigError(f"{config_path}: {len(problems)} problem(s) found before running:\n" + "\n".join(f"  - {p}" for p in problems))
    return notes


def _read_model_config(cfg: RunConfig, problems: list[str] | None) -> dict | None:
    """The model's config.json; without one, a problem is added to `problems` (None: only skip)."""
    base = Path(cfg.base_model)
    config_file = base / "config.json"
    if not config_file.is_file():
        if problems is None:
            return None
        problems.append(
            f"`base_model`: {cfg.base_model} is not a local model directory with config.json "
            "(loraflow never downloads; build the tiny model with `loraflow tiny-model DIR` or point at a local copy)"
        )
        return None
    return json.loads(config_file.read_text())


def _missing_target_modules(cfg: RunConfig) -> list[str]:
    targets = cfg.lora_target_modules
    if isinstance(targets, str):
        return []  # `all-linear` or a regex: peft resolves it against the loaded model
    module_names = _weight_module_names(Path(cfg.base_model))
    if not module_names:
        return []
    return [target for target in targets if target not in module_names]


def _weight_module_names(base: Path) -> set[str]:
    """Last name component of every weight's module, read from safetensors headers only."""
    from safetensors import safe_open

    names: set[str] = set()
    for weights in base.glob("*.safetensors"):
        with safe_open(str(weights), framework="numpy") as handle:
            for key in handle.keys():
                parts = key.split(".")
                if len(parts) >= 2:
                    names.add(parts[-2])
    return names
