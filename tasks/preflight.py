"""Checks that fail a run in seconds, before any data or weights are loaded.

Everything here reads only small files (config.json, safetensors headers, contract YAML) and never
imports torch, so `loraflow validate` answers in about a second. All problems are reported at
once, each with the setting to change.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import hub
from tasks.axolotl_keys import GPU_ONLY_OPTIMIZERS
from tasks.config import ConfigError, RunConfig
from tasks.config_load import check_config
from tasks.contracts import ContractError, load_contract
from tasks.formats import DatasetError, check_source
from tasks.gpus import visible_gpus
from tasks.launch import deepspeed_problems, machine_problems, plan_processes
from tasks.memory import hardware_problems


@dataclass
class Checks:
    """What the checks share, and what they found. `for_run=False` (`loraflow validate`, e.g. of a GPU
    recipe on a laptop): a check that needs a GPU, or the model, is skipped with a note instead of
    failing."""

    cfg: RunConfig
    for_run: bool
    gpus: list[Any]
    # The stages run on a Ray cluster: its nodes' GPUs count, not this machine's (none may be visible here).
    gpus_elsewhere: bool
    model_config: dict | None
    processes: int
    # Why the model's config.json is not here (a hub id missing from the cache offline, a wrong path).
    model_missing: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_gpu_checks: list[str] = field(default_factory=list)

    def needs_gpu(self, problem: str) -> None:
        """A problem on this machine only because no GPU is visible: a note in `validate`."""
        if self.gpus or (self.for_run and not self.gpus_elsewhere):
            self.problems.append(problem)
        else:
            self.skipped_gpu_checks.append(problem)


def check_datasets(checks: Checks) -> None:
    for index, dataset in enumerate(checks.cfg.datasets):
        if not Path(dataset.path).exists():
            if _looks_local(dataset.path):
                checks.problems.append(f"`datasets[{index}].path`: {dataset.path} not found")
                continue
            try:  # a hub dataset id: in the cache (or downloadable) for a run, a note for validate
                hub.resolve(dataset.path, what=f"datasets[{index}].path", repo_type="dataset")
            except hub.ModelNotFoundError as error:
                if checks.for_run:
                    checks.problems.append(str(error))
                else:
                    checks.notes.append(f"dataset checks skipped for `datasets[{index}]`: {error}")
                continue
        try:
            check_source(dataset)
        except DatasetError as error:
            checks.problems.append(f"`datasets[{index}]`: {error}")
        if dataset.contract:
            try:
                load_contract(Path(checks.cfg.contract.dir), dataset.contract)
            except ContractError as error:
                checks.problems.append(f"`datasets[{index}].contract`: {error}")


def check_model(checks: Checks) -> None:
    cfg = checks.cfg
    if checks.model_config is None:
        if checks.for_run:
            checks.problems.append(f"`base_model`: {checks.model_missing}")
        else:
            checks.notes.append(
                f"model checks skipped: {checks.model_missing} (sequence_len limit, LoRA targets, memory estimate)"
            )
        return
    limit = checks.model_config.get("max_position_embeddings")
    if limit and cfg.sequence_len > limit:
        checks.problems.append(
            f"`sequence_len` {cfg.sequence_len} is above the model's maximum of {limit} "
            f"(max_position_embeddings); set sequence_len <= {limit}"
        )
    missing = _missing_target_modules(cfg)
    if missing:
        checks.problems.append(
            f"`lora_target_modules`: {', '.join(missing)} not found in the model's layers; "
            "use names from the model (e.g. q_proj, v_proj) or `all-linear`"
        )


def check_hardware(checks: Checks) -> None:
    for problem in hardware_problems(checks.cfg, checks.gpus):
        checks.needs_gpu(problem)


def check_machines(checks: Checks) -> None:
    checks.problems.extend(machine_problems(checks.cfg))
    if checks.cfg.num_machines > 1:
        checks.notes.append(
            f"{checks.cfg.num_machines} machines train together ({checks.processes} processes in all): start the same config "
            "on each with its own LORAFLOW_MACHINE_RANK, on a state_dir every machine shares (deployments/README.md)"
        )


def check_flash_attention(checks: Checks) -> None:
    cfg = checks.cfg
    if not (cfg.flash_attention or cfg.attn_implementation == "flash_attention_2"):
        return
    if not cfg.bf16:
        problem = "`flash_attention: true` needs half precision; set `bf16: true` (flash-attn has no fp32 kernels)"
        # `bf16: auto` resolved to fp32 only because no GPU is visible here.
        if cfg.precision_was_auto:
            checks.needs_gpu(problem)
        else:
            checks.problems.append(problem)
    if importlib.util.find_spec("flash_attn") is None:
        checks.needs_gpu(
            "`flash_attention: true` but flash-attn is not installed; install the `gpu` extra or set flash_attention: false"
        )


def check_deepspeed(checks: Checks) -> None:
    if not checks.cfg.deepspeed:
        return
    checks.problems.extend(deepspeed_problems(checks.cfg, checks.processes))
    if importlib.util.find_spec("deepspeed") is None:
        checks.needs_gpu("`deepspeed` is set but DeepSpeed is not installed; install the `gpu` extra (or `pip install deepspeed`)")


def check_fsdp(checks: Checks) -> None:
    if checks.cfg.fsdp_config is not None and checks.processes < 2:
        checks.needs_gpu(
            f"`fsdp` shards the model across processes but {checks.processes} will run; use two or more GPUs "
            "(`num_processes`), or drop `fsdp` and save memory with `adapter: qlora` / `gradient_checkpointing: true`"
        )


def check_kernels(checks: Checks) -> None:
    if checks.cfg.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        checks.needs_gpu("`liger_kernel: true` but liger-kernel is not installed; install the `gpu` extra or set liger_kernel: false")


def check_quantization(checks: Checks) -> None:
    cfg = checks.cfg
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        checks.problems.append("`adapter: qlora` needs bitsandbytes; `pip install bitsandbytes` or use `adapter: lora`")
    if cfg.load_in_8bit and not checks.gpus:
        checks.needs_gpu(
            "`load_in_8bit` (bitsandbytes LLM.int8 weights) needs a CUDA GPU and none is visible; use `adapter: qlora` "
            "(4-bit nf4, which also trains on a CPU) or plain `lora`"
        )


def check_export_formats(checks: Checks) -> None:
    """`export.quantize`: a format needing a GPU, or a tool not installed here, fails a run now rather
    than after training; `validate` notes it (the run may happen on another machine)."""
    from tasks.inference_formats import FORMATS, QuantizedExportError, missing_piece

    for name in checks.cfg.export.quantize:
        try:
            reason = missing_piece(name, checks.cfg.export, has_gpu=bool(checks.gpus))
        except QuantizedExportError as error:  # a tool path that is set but wrong: wrong everywhere
            checks.problems.append(str(error))
            continue
        if reason is None:
            continue
        if FORMATS[name].needs_gpu and not checks.gpus:
            checks.needs_gpu(reason)
        elif checks.for_run:
            checks.problems.append(reason)
        else:
            checks.notes.append(f"not installed here: {reason}")


def check_optimizer(checks: Checks) -> None:
    if checks.cfg.optimizer in GPU_ONLY_OPTIMIZERS and not checks.gpus:
        checks.needs_gpu(f"`optimizer: {checks.cfg.optimizer}` needs a CUDA GPU and none is visible; use `optimizer: adamw_torch`")


def check_tokenizer_and_adapter_files(checks: Checks) -> None:
    """Local files the tokenizer settings and a warm start name (hub ids are resolved at run time)."""
    cfg = checks.cfg
    for setting, value, marker in (
        ("tokenizer_config", cfg.tokenizer_config, "tokenizer_config.json"),
        ("lora_model_dir", cfg.lora_model_dir, "adapter_config.json"),
        ("base_model_config", cfg.base_model_config, "config.json"),
    ):
        if value is None or not _looks_local(value):
            continue
        if not (Path(value) / marker).is_file():
            checks.problems.append(f"`{setting}`: {value} has no {marker}; point it at a directory holding one")
    jinja = cfg.chat_template_jinja
    if jinja and "{" not in jinja and jinja.endswith(".jinja") and not Path(jinja).is_file():
        checks.problems.append(f"`chat_template_jinja`: {jinja} not found; give the template text or an existing .jinja file")


def check_eval(checks: Checks) -> None:
    cfg = checks.cfg
    if cfg.eval.endpoint == "external" and not (cfg.eval.base_url and cfg.eval.model):
        checks.problems.append("`eval.endpoint: external` needs `eval.base_url` and `eval.model`")
    key_settings = (("eval.api_key_env", cfg.eval.api_key_env), ("eval.judge.api_key_env", cfg.eval.judge and cfg.eval.judge.api_key_env))
    for setting, env_name in key_settings:
        if env_name and not os.environ.get(env_name):
            checks.problems.append(f"`{setting}` names the environment variable {env_name}, which is not set; export it before running")
    if cfg.eval.endpoint == "vllm":
        from tasks.serving import EndpointUnavailableError, check_vllm_available

        try:
            check_vllm_available()
        except EndpointUnavailableError as error:
            checks.needs_gpu(str(error))
    if cfg.val_set_size == 0:
        checks.notes.append(
            "`val_set_size: 0`: no val split; eval scores the pinned `eval.test_set`" if cfg.eval.test_set else
            "`val_set_size: 0`: no val split and no `eval.test_set`: eval is skipped and the promotion gate has nothing "
            "to compare (the merge is still verified, on a few training prompts)"
        )


def check_disk(checks: Checks) -> None:
    """What the run writes (shards, checkpoints x save_total_limit, the export) against the free
    space where `state_dir` lives (`tasks/disk.py`): refused now rather than at the first full checkpoint."""
    from tasks.disk import disk_problem, estimate_disk_usage

    if checks.model_config is None:
        checks.notes.append(f"disk check skipped: {checks.cfg.base_model} has no config.json here to size checkpoints and the export from")
        return
    try:
        estimate = estimate_disk_usage(checks.cfg, checks.model_config)
    except KeyError as error:
        checks.notes.append(f"disk check skipped: the model's config.json has no {error} (not a Llama-style config)")
        return
    checks.notes.extend(estimate.notes)
    if (problem := disk_problem(checks.cfg, estimate)) is not None:
        checks.problems.append(problem)


# Every preflight check, in the order its findings are listed.
def check_tracking(checks: Checks) -> None:
    """MLflow / W&B installed and reachable before a run trains for an hour and then cannot log it;
    `validate` (maybe on another machine than the runs) reports an unreachable server as a note."""
    from tasks.tracking import preflight_problems

    for problem in preflight_problems(checks.cfg):
        (checks.problems if checks.for_run or "pip install" in problem else checks.notes).append(problem)


CHECKS: tuple[Callable[[Checks], None], ...] = (
    check_datasets, check_model, check_hardware, check_machines, check_flash_attention, check_deepspeed, check_fsdp, check_kernels,
    check_quantization, check_export_formats, check_optimizer, check_tokenizer_and_adapter_files, check_eval, check_disk,
    check_tracking,
)


def run_checks(cfg: RunConfig, *, for_run: bool = True, gpus_elsewhere: bool = False) -> Checks:
    """Runs every check; returns what they found (problems and notes), never raises for a finding."""
    gpus = visible_gpus()
    model_config, model_missing = _read_model_config(cfg)
    checks = Checks(cfg, for_run, gpus, gpus_elsewhere, model_config, plan_processes(cfg, gpus).processes, model_missing=model_missing)
    for check in CHECKS:
        check(checks)
    checks.problems = list(dict.fromkeys(checks.problems))  # two checks may name the same setting
    if checks.skipped_gpu_checks:
        settings = dict.fromkeys(problem.split("`")[1].split(":")[0] for problem in checks.skipped_gpu_checks)
        where = " (the stages run on the Ray cluster: its GPUs decide)" if gpus_elsewhere else ""
        checks.notes.append(f"GPU checks skipped: no GPU is visible here{where}, and this config needs one for: " + "; ".join(settings))
    return checks


def preflight(cfg: RunConfig, config_path: str | Path = "config", *, for_run: bool = True, gpus_elsewhere: bool = False) -> list[str]:
    """Raises ConfigError listing every problem; returns notes on checks that were skipped.

    With `for_run=False` (`loraflow validate`, e.g. of a GPU recipe on a laptop), a missing base
    model or a machine without a GPU skips the checks that need them, with a note, instead of failing.
    """
    checks = run_checks(cfg, for_run=for_run, gpus_elsewhere=gpus_elsewhere)
    if checks.problems:
        raise ConfigError(
            f"{config_path}: {len(checks.problems)} problem(s) found before running:\n" + "\n".join(f"  - {p}" for p in checks.problems)
        )
    return checks.notes


@dataclass
class Validation:
    """`loraflow validate`'s answer: every problem and note of the schema and the preflight checks."""

    config: str
    problems: list[str]
    notes: list[str]
    memory_estimate: dict[str, Any] | None = None
    estimate_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"config": self.config, "ok": self.ok, "problems": self.problems, "notes": self.notes,
                "memory_estimate": self.memory_estimate}


def validate_config(config_path: str | Path) -> Validation:
    """The schema and every preflight check in one pass, as `loraflow validate` reports them. Schema
    errors do not hide the preflight findings: the checks run on the settings that are valid."""
    from tasks.launch import zero_stage
    from tasks.memory import describe_estimate, estimate_peak_memory

    try:
        report = check_config(config_path)
    except ConfigError as error:
        return Validation(str(config_path), [str(error).removeprefix(f"{config_path}: ")], [])
    problems, notes = list(report.problems), list(report.notes)
    if report.cfg is None:
        notes.append("preflight checks skipped: the config lacks a setting they need (see the problems)")
        return Validation(str(config_path), problems, notes)
    checks = run_checks(report.cfg, for_run=False)
    problems += [problem for problem in checks.problems if problem not in problems]
    notes += checks.notes
    validation = Validation(str(config_path), problems, notes)
    if checks.model_config is not None and not report.partial:
        try:
            stage = zero_stage(report.cfg)
        except ValueError:
            stage = None  # an unreadable DeepSpeed JSON is reported above
        estimate = estimate_peak_memory(report.cfg, checks.model_config, checks.processes, stage)
        validation.memory_estimate = {**{key: round(value, 3) for key, value in estimate.items()}, "processes": checks.processes,
                                      "unit": "GB"}
        validation.estimate_lines = describe_estimate(report.cfg, estimate, checks.gpus, checks.processes)
        from tasks.disk import describe_disk, estimate_disk_usage

        validation.estimate_lines.append(describe_disk(report.cfg, estimate_disk_usage(report.cfg, checks.model_config)))
    return validation


def _looks_local(value: str) -> bool:
    """A path, not a hub id (`org/name`)."""
    return not hub.is_hub_id(value)


def _read_model_config(cfg: RunConfig) -> tuple[dict | None, str]:
    """The model's config.json (from `base_model_config` when set), resolved as the run will
    (hub cache first); else None and why it is not here."""
    try:
        if cfg.base_model_config:
            source = hub.resolve(cfg.base_model_config, what="base_model_config").path
        else:
            source = hub.base_model(cfg).path
    except hub.ModelNotFoundError as error:
        return None, str(error)
    config_file = source / "config.json"
    if not config_file.is_file():
        return None, f"{cfg.base_model} ({source}) has no config.json; point it at a model directory in Hugging Face format"
    return json.loads(config_file.read_text()), ""


def _missing_target_modules(cfg: RunConfig) -> list[str]:
    targets = cfg.lora_target_modules
    if isinstance(targets, str):
        return []  # `all-linear` or a regex: peft resolves it against the loaded model
    module_names = _weight_module_names(hub.base_model(cfg).path)
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
