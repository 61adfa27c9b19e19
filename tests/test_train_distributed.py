"""Training in several processes (`accelerate launch`), exercised on a CPU with two processes (DDP over gloo).

- a two-process run of the Prefect train task publishes its manifest, and its progress reaches the
  Prefect UI (progress artifact at 100%, loss-curve table, step log lines) and the task's log;
- one training process SIGKILLed mid-run fails the task with a LaunchError that says a re-run
  resumes; the task process SIGKILLed mid-run takes every training process down with it; each
  re-run resumes from the newest complete checkpoint, and the last one ends with the adapter bytes
  and loss curve of the uninterrupted two-process run;
- without GPUs: the process plan, the launch command, DeepSpeed JSON checks, FSDP settings as the
  Trainer receives them, and what the train fingerprint covers.

GPU-only paths (NCCL, DeepSpeed ZeRO, FSDP sharding) cannot run here: the Trainer silently turns
FSDP into DDP on a CPU, and DeepSpeed needs CUDA, so preflight refuses both without GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time

import psutil
import pytest
import yaml

from tasks.checkpoints import checkpoint_step, latest_complete_checkpoint
from tasks.config import RunConfig
from tasks.config_load import load_config
from tasks.fingerprint import FileHasher
from tasks.gpus import GpuInfo
from tasks.launch import ProcessPlan, deepspeed_problems, launch_command, plan_processes
from tasks.memory import hardware_problems
from tasks.stage import artifact_key, prefect_task, stage_key
from tasks.stages import TRAIN
from tasks.train import training_arguments
from tests.train_stage import REPO, Stage, Template, assert_same_result, build_template, new_stage

RUN_NAME = "DDP Check"
H100 = GpuInfo(0, "NVIDIA H100", 85.0, 9.0)


@pytest.fixture(scope="module")
def ddp_template(tiny_model_dir, tmp_path_factory) -> Template:
    # Logging every 5 steps, checkpoints every 4: steps 4 and 8 are logged too (a resume starts a
    # logging interval there), and 12 because it is the last, in every process.
    return build_template(tmp_path_factory.mktemp("ddp-template"), tiny_model_dir, name=RUN_NAME, num_processes=2, logging_steps=5)


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


TRAIN_TASK = prefect_task(TRAIN)


@pytest.fixture(scope="module")
def reference(ddp_template, tmp_path_factory, prefect_harness) -> tuple[Stage, dict, list[str]]:
    """An uninterrupted two-process run of the Prefect train task, with its log lines."""
    from prefect import flow

    stage = new_stage(ddp_template, tmp_path_factory.mktemp("ddp-reference"))

    @flow
    def train_only() -> dict:
        return TRAIN_TASK.with_options(refresh_cache=True)(stage.cfg, stage.fingerprint, {"prep": stage.prep_manifest})

    lines = LogLines()
    logger = logging.getLogger("loraflow.train")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        manifest = train_only()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return stage, manifest, lines.lines


def training_processes(stage: Stage) -> list[psutil.Process]:
    """The launcher and worker processes of this stage (their command lines carry its work directory)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        ours = any(stage.fingerprint in part for part in cmdline)
        if ("tasks.launch" in cmdline or "tasks.train_worker" in cmdline) and ours and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def kill_one_worker(stage: Stage) -> None:
    workers = [process for process in training_processes(stage) if "tasks.launch" not in process.cmdline()]
    assert len(workers) == 2, [process.cmdline() for process in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)


def assert_no_training_process_left(stage: Stage) -> None:
    deadline = time.monotonic() + 20
    while (left := training_processes(stage)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [process.cmdline() for process in left]


def newest_complete_step(stage: Stage) -> int:
    checkpoint = latest_complete_checkpoint(stage.checkpoints)
    return checkpoint_step(checkpoint) if checkpoint else 0


def test_two_processes_train_and_report_progress_to_prefect(reference):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    stage, manifest, lines = reference

    assert manifest["processes"] == 2 and manifest["global_step"] == 12 and manifest["resumed_from_step"] is None
    assert manifest["eval_loss"] < manifest["first_logged_loss"]
    assert (stage.final_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (stage.final_dir / "adapter" / "training_args.bin").exists()
    assert "train: launching 2 DDP processes" in lines
    assert any(line.startswith("train process: [rank 0] train: 12 steps") for line in lines)
    train_lines = [line.split()[1] for line in lines if line.startswith("step ") and "eval loss" not in line]
    assert train_lines == ["4/12", "5/12", "8/12", "10/12", "12/12"]
    assert [line.split()[1] for line in lines if line.startswith("step ") and "eval loss" in line] == ["4/12", "8/12", "12/12"]
    with get_client(sync_client=True) as client:
        def latest(what: str):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(RUN_NAME, what)])))
            assert found, what
            return found[-1]

        assert float(latest("train-progress").data) == 100.0
        assert [row["step"] for row in yaml.safe_load(latest("loss-curve").data)] == [4, 5, 8, 10, 12]


def test_killed_processes_fail_the_task_and_each_rerun_resumes_to_the_uninterrupted_result(ddp_template, reference, tmp_path, caplog):
    reference_stage, reference_manifest, _ = reference
    stage = new_stage(ddp_template, tmp_path)

    # One training process dies: the others are stopped and the task fails, saying what to do.
    stderr = stage.run_and_kill(lambda: newest_complete_step(stage) >= 4, kill=lambda driver: kill_one_worker(stage))
    assert "LaunchError: the 2 training processes failed" in stderr
    assert "a re-run resumes from the last complete checkpoint" in stderr
    assert_no_training_process_left(stage)

    # The task process itself dies: no training process outlives it.
    resumed_at = newest_complete_step(stage)
    assert resumed_at >= 4
    stderr = stage.run_and_kill(lambda: newest_complete_step(stage) > resumed_at)
    assert f"train: resuming from step {resumed_at}" in stderr
    assert_no_training_process_left(stage)

    resumed_at = newest_complete_step(stage)
    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        manifest = stage.run()

    assert f"train: resuming from step {resumed_at}" in caplog.text
    assert manifest["resumed_from_step"] == resumed_at < 12
    assert_same_result(stage, reference_stage)
    for key in ("global_step", "train_loss", "eval_loss", "tokens_seen", "processes"):
        assert manifest[key] == reference_manifest[key], key


# --- without GPUs: plan, command, checks ---------------------------------------------------------


def config(**settings) -> RunConfig:
    return RunConfig(base_model="models/llama", datasets=[{"path": "rows.jsonl"}], **settings)


def test_process_plan_follows_gpus_num_processes_and_sharding(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    four_gpus = [GpuInfo(index, "NVIDIA H100", 85.0, 9.0) for index in range(4)]

    assert plan_processes(config(), []) == ProcessPlan(1, "single")
    assert not plan_processes(config(), [H100]).launched
    assert plan_processes(config(), four_gpus) == ProcessPlan(4, "ddp")
    assert plan_processes(config(num_processes=2), []) == ProcessPlan(2, "ddp")
    assert plan_processes(config(num_processes=1), four_gpus) == ProcessPlan(1, "single")
    assert plan_processes(config(deepspeed=str(tmp_path / "ds.json")), [H100]) == ProcessPlan(1, "deepspeed")
    assert plan_processes(config(fsdp=["full_shard", "auto_wrap"]), four_gpus) == ProcessPlan(4, "fsdp")


def test_launch_command_runs_accelerate_launch_with_the_strategy(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    worker = ["WORK_DIR"]

    ddp = launch_command(config(bf16=True), ProcessPlan(4, "ddp"), worker, 29500)
    assert ddp[1:3] == ["-m", "tasks.launch"]
    assert ddp[-3:] == ["-m", "tasks.train_worker", "WORK_DIR"]
    flags = ddp[3:-3]
    assert "--multi_gpu" in flags
    for name, value in (("--num_processes", "4"), ("--main_process_port", "29500"), ("--mixed_precision", "bf16")):
        assert flags[flags.index(name) + 1] == value

    deepspeed = launch_command(config(deepspeed=str(tmp_path / "ds.json")), ProcessPlan(1, "deepspeed"), worker, 1)
    assert "--use_deepspeed" in deepspeed and "--multi_gpu" not in deepspeed
    assert deepspeed[deepspeed.index("--deepspeed_config_file") + 1] == str((tmp_path / "ds.json").resolve())
    # FSDP comes from the Trainer's arguments; the launcher only starts the processes.
    fsdp = launch_command(config(fsdp=["full_shard"]), ProcessPlan(2, "fsdp"), worker, 1)
    assert "--multi_gpu" in fsdp and "--use_fsdp" not in fsdp


def test_shipped_deepspeed_configs_fill_everything_from_the_config():
    for name in ("zero2", "zero3"):
        cfg = config(deepspeed=str(REPO / "configs" / "deepspeed" / f"{name}.json"), micro_batch_size=3, bf16=True)
        assert deepspeed_problems(cfg, 8) == [], name


def test_deepspeed_json_contradicting_the_config_is_named_before_anything_runs(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 16, "train_batch_size": 64, "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": "auto"}},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }))
    problems = deepspeed_problems(config(deepspeed=str(path), micro_batch_size=2, gradient_accumulation_steps=4), 8)

    assert len(problems) == 3, problems  # train_batch_size 64 = 2 x 4 x 8 processes agrees; "auto" values fill in
    assert any("train_micro_batch_size_per_gpu is 16 but micro_batch_size is 2 here" in problem for problem in problems)
    assert any("bf16.enabled is True but bf16 is False here" in problem for problem in problems)
    assert any("optimizer.params.lr is 1e-05 but learning_rate is 0.0002 here" in problem for problem in problems)
    assert all(problem.startswith(f"`deepspeed` {path}:") and '"auto"' in problem for problem in problems)

    path.write_text('{"zero_optimization": {"stage": 4}}')
    assert "zero_optimization.stage is 4" in deepspeed_problems(config(deepspeed=str(path)), 1)[0]
    path.write_text('{"zero_optimization": {"stage": 3}}')
    assert "stage3_gather_16bit_weights_on_model_save: true" in deepspeed_problems(config(deepspeed=str(path)), 1)[0]
    path.write_text("{not json")
    assert "is not valid JSON" in deepspeed_problems(config(deepspeed=str(path)), 1)[0]
    assert "cannot read" in deepspeed_problems(config(deepspeed=str(tmp_path / "missing.json")), 1)[0]


def test_distributed_settings_on_hardware_that_cannot_run_them():
    on_cpu = hardware_problems(config(deepspeed="ds.json"), [])
    assert len(on_cpu) == 1 and on_cpu[0].startswith("`deepspeed` needs CUDA GPUs") and "num_processes: 2" in on_cpu[0]
    fsdp_on_cpu = hardware_problems(config(fsdp=["full_shard"]), [])
    assert len(fsdp_on_cpu) == 1 and "fall back to DDP" in fsdp_on_cpu[0]
    assert hardware_problems(config(num_processes=2), []) == []  # DDP over gloo
    too_many = hardware_problems(config(num_processes=4), [H100])
    assert too_many == ["`num_processes` 4 but 1 GPU(s) are visible; set num_processes: 1 or leave it unset (one process per visible GPU)"]


def test_axolotl_fsdp_settings_reach_the_trainer_as_fsdp2(tmp_path):
    raw = {
        "base_model": "models/llama", "datasets": [{"path": "rows.jsonl"}],
        "fsdp": ["shard_grad_op", "auto_wrap", "offload"],
        "fsdp_config": {"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                        "fsdp_cpu_ram_efficient_loading": True, "fsdp_state_dict_type": "FULL_STATE_DICT"},
    }
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "fsdp.yaml")

    arguments = training_arguments(cfg, tmp_path / "checkpoints", has_val=False)
    plugin = arguments.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer" and plugin["cpu_ram_efficient_loading"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert arguments.ddp_find_unused_parameters is False

    # Axolotl's FSDP1 configs run as FSDP2 (the same sharding; transformers deprecates FSDP1), with a note.
    raw["fsdp_config"] = {"fsdp_version": 1}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(raw))
    fsdp1 = load_config(tmp_path / "fsdp.yaml")
    assert fsdp1.fsdp_config.version == 2 and any("FSDP2" in note for note in fsdp1.notes)


def test_train_fingerprint_covers_processes_and_the_deepspeed_json_content_not_its_path(ddp_template, tmp_path):
    cfg = load_config(ddp_template.config_path)
    hasher = FileHasher()
    (tmp_path / "a").mkdir()
    shipped = REPO / "configs" / "deepspeed" / "zero2.json"
    shutil.copy(shipped, tmp_path / "a" / "zero2.json")
    shutil.copy(shipped, tmp_path / "moved.json")

    def train_fingerprint(**changes) -> str:
        return stage_key(TRAIN, cfg.model_copy(update=changes), {"prep": ddp_template.prep_manifest}, hasher)

    assert train_fingerprint(num_processes=2) == ddp_template.fingerprint
    assert train_fingerprint(num_processes=3) != ddp_template.fingerprint
    at_a = train_fingerprint(deepspeed=str(tmp_path / "a" / "zero2.json"))
    assert train_fingerprint(deepspeed=str(tmp_path / "moved.json")) == at_a
    settings = json.loads(shipped.read_text())
    settings["zero_optimization"]["overlap_comm"] = False
    (tmp_path / "moved.json").write_text(json.dumps(settings))
    assert train_fingerprint(deepspeed=str(tmp_path / "moved.json")) != at_a
