"""Training beyond one job on one machine's GPUs, on a CPU:

- multi-node, as two "machines" on this host: two train stages started side by side with
  `num_machines: 2`, `machine_rank` 0 and 1, meeting at 127.0.0.1 over gloo, one process each, on
  one shared state_dir, train the same adapter as one machine with two processes;
- each job holds its GPUs through the allocator (LORAFLOW_FAKE_GPUS, a lock directory per
  machine): the launched processes get the CUDA_VISIBLE_DEVICES of their lease, and a job holding
  one GPU of several trains in a child process the adapter it would train in the task's own.

What cannot run here: NCCL between real hosts, and a Kubernetes pod per machine (deployments/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks import store
from tasks.config import MACHINE_RANK_ENV, RunConfig
from tasks.config_load import load_config
from tasks.gpu_allocator import FAKE_GPUS_ENV, LOCK_DIR_ENV
from tasks.gpus import GpuInfo
from tasks.launch import launch_command, machine_problems, plan_processes
from tasks.serving import free_port
from tasks.stage import stage_key
from tasks.stages import TRAIN
from tasks.train import ADAPTER, METRICS
from tests.train_stage import REPO, SUBPROCESS_ENV, build_template, loss_curve, new_stage, one_thread  # noqa: F401

# One machine's train stage, as the pipeline runs it; its log on stderr.
MACHINE = """
import json, logging, sys
from tasks.config_load import load_config
from tasks.stage import run_stage
from tasks.stages import TRAIN

logging.basicConfig(level=logging.INFO, force=True, format="%(asctime)s %(message)s")
manifest = run_stage(TRAIN, load_config(sys.argv[1]), {"prep": json.loads(open(sys.argv[3]).read())}, key=sys.argv[2])
print(json.dumps(manifest))
"""


@pytest.fixture(scope="module")
def template(tiny_model_dir, tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("multinode-template"), tiny_model_dir, name="Multi Node", num_processes=2)


def test_two_machines_with_one_process_each_train_the_adapter_of_one_machine_with_two(template, tmp_path, monkeypatch, caplog):
    import logging

    # One machine, two processes (on 2 of 4 simulated GPUs).
    monkeypatch.setenv(FAKE_GPUS_ENV, "4")
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks-one"))
    one_machine = new_stage(template, tmp_path / "one")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        reference = one_machine.run()
    one_machine_s = time.monotonic() - started
    assert "train: launching 2 DDP processes on GPU 0,1" in caplog.text

    # Two machines, one process each, one state_dir.
    two = tmp_path / "two"
    raw = yaml.safe_load(template.config_path.read_text())
    raw.update(state_dir=str(two / "state"), num_machines=2, main_process_ip="127.0.0.1", main_process_port=free_port())
    new_stage(template, two)  # copies the prep output into two/state
    config_path = two / "multinode.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    assert plan_processes(cfg).per_machine == 1 and plan_processes(cfg).processes == 2
    key = stage_key(TRAIN, cfg, {"prep": template.prep_manifest})
    (two / "prep.json").write_text(json.dumps(template.prep_manifest))
    machines = []
    started = time.monotonic()
    for rank in (1, 0):  # machine 1 first: it waits for machine 0
        machines.append(subprocess.Popen(
            [sys.executable, "-c", MACHINE, str(config_path), key, str(two / "prep.json")], cwd=REPO, text=True,
            env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(REPO), MACHINE_RANK_ENV: str(rank), FAKE_GPUS_ENV: "1",
                 LOCK_DIR_ENV: str(tmp_path / f"locks-machine-{rank}")},
            stdout=subprocess.PIPE, stderr=(two / f"machine-{rank}.log").open("w"),
        ))
    try:
        outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    two_machines_s = time.monotonic() - started
    logs = {rank: (two / f"machine-{rank}.log").read_text() for rank in (0, 1)}
    assert [machine.returncode for machine in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    follower, main = (json.loads(output.strip().splitlines()[-1]) for output in outputs)
    for rank in (0, 1):
        assert f"train: launching 2 DDP processes (1 on machine {rank} of 2) on GPU 0" in logs[rank]
    assert "train process: [rank 1]" in logs[1] and "train process: [rank 0] train: 12 steps" in logs[0]

    # Machine 0 published; machine 1 got the same manifest back.
    assert follower == main == store.read_manifest(store.stage_dir(cfg, "train", key))
    final_dir = store.stage_dir(cfg, "train", key)
    adapter = Path(ADAPTER) / "adapter_model.safetensors"
    assert (final_dir / adapter).read_bytes() == (one_machine.final_dir / adapter).read_bytes()
    metrics = [json.loads(line) for line in (final_dir / METRICS).read_text().splitlines()]
    assert loss_curve(metrics) == loss_curve(one_machine.metrics())
    for name in ("processes", "global_step", "train_loss", "eval_loss", "tokens_seen", "adapter_sha256"):
        assert main[name] == reference[name], name
    print(f"\none machine x 2 processes: {one_machine_s:.1f} s; two machines x 1 process: {two_machines_s:.1f} s")


@pytest.mark.usefixtures("one_thread")
def test_a_job_holding_one_gpu_of_several_trains_in_a_child_the_adapter_it_trains_in_the_task(template, tmp_path, monkeypatch, caplog):
    import logging

    from tasks.gpu_allocator import acquire
    from tasks.stage import run_stage

    raw = yaml.safe_load(template.config_path.read_text())
    del raw["num_processes"]  # one process per visible GPU: one here

    def train(directory: Path) -> tuple[dict, Path]:
        new_stage(template, directory)
        raw["state_dir"] = str(directory / "state")
        (directory / "one-process.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(directory / "one-process.yaml")
        key = stage_key(TRAIN, cfg, {"prep": template.prep_manifest})
        manifest = run_stage(TRAIN, cfg, {"prep": template.prep_manifest}, key=key)
        return manifest, store.stage_dir(cfg, "train", key) / ADAPTER / "adapter_model.safetensors"

    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        in_task, in_task_adapter = train(tmp_path / "in-task")  # no GPU: trains in this process
        assert "train: launching" not in caplog.text
        monkeypatch.setenv(FAKE_GPUS_ENV, "2")
        monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's threads as this process's (one_thread)
        with acquire(1, job="another job"):  # GPU 0 is taken
            in_child, in_child_adapter = train(tmp_path / "in-child")
    assert "train: launching 1 process on GPU 1" in caplog.text
    assert in_child_adapter.read_bytes() == in_task_adapter.read_bytes()
    for name in ("processes", "global_step", "train_loss", "eval_loss", "adapter_sha256"):
        assert in_child[name] == in_task[name], name


def test_multi_node_settings_are_checked_before_anything_runs(template):
    cfg = load_config(template.config_path)
    assert machine_problems(cfg) == []
    problems = machine_problems(cfg.model_copy(update={"num_machines": 2, "machine_rank": 2, "num_processes": 3}))
    assert len(problems) == 3
    assert problems[0].startswith("`machine_rank` 2 but `num_machines` 2: ranks run from 0 to 1")
    assert problems[1].startswith("`num_machines` 2 needs `main_process_ip`")
    assert problems[2].startswith("`num_processes` 3 counts the processes of all 2 machines")


def test_launch_command_across_machines(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    cfg = RunConfig(
        base_model="models/llama", datasets=[{"path": "rows.jsonl"}], num_machines=2, machine_rank=1, main_process_ip="10.0.0.4"
    )
    plan = plan_processes(cfg, [GpuInfo(index, "NVIDIA H100", 85.0, 9.0) for index in range(8)])
    assert (plan.processes, plan.per_machine, plan.machines) == (16, 8, 2)  # the default: every visible GPU on each machine
    command = launch_command(cfg, plan, ["WORK_DIR"], 29500)
    assert "--multi_gpu" in command
    for name, value in (("--num_processes", "16"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.4"), ("--main_process_port", "29500")):
        assert command[command.index(name) + 1] == value, name
    deepspeed = cfg.model_copy(update={"deepspeed": str(tmp_path / "ds.json"), "num_processes": 4})
    command = launch_command(deepspeed, plan_processes(deepspeed, []), ["WORK_DIR"], 29500)
    assert command[command.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert command[command.index("--num_processes") + 1] == "4"
