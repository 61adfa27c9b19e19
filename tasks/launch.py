"""Training in several processes: the train task starts `accelerate launch` and follows it.

One process trains inside the train task itself. More than one (several visible GPUs, or
`num_processes`), a `deepspeed` / `fsdp` setting, or a job holding only some of the visible GPUs
(`tasks/gpu_allocator.py`), and the task instead starts
`accelerate launch -m tasks.train_worker ...` (torchrun underneath: DDP over NCCL on GPUs, over
gloo on a CPU; DeepSpeed or FSDP as configured through the Trainer). Every process runs the same
`train.train_in_process`; the main one writes metrics, checkpoint markers and the adapter, and
hands the manifest fields back in `train_result.json`, so checkpoints, resumption and the
manifest are the same as in one process. This module never imports `tasks.train` (the worker
entry point does), so the two do not import each other.

What a user can rely on:
- The number of processes is part of the train fingerprint (it changes the effective batch), so a
  run resumes only from checkpoints written by the same number of processes.
- Killing the train task kills every training process (each dies with its parent), so no orphan
  keeps writing checkpoints while the stage is run again.
- Progress reaches the task's callbacks (Prefect artifacts and logs, the terminal bar) from the
  main process's `progress.json` and `metrics.jsonl`, and the processes' output reaches the
  task's log; a failed launch raises `LaunchError` with the exit status and the last lines.
- `deepspeed_problems` checks a DeepSpeed JSON against this config before anything starts.
- Several machines (`num_machines`): each runs the train stage with its `machine_rank`; their
  processes meet at `main_process_ip:main_process_port` and train in the same directory of a
  shared state_dir. Machine 0's processes include the main one (global rank 0), which writes the
  checkpoint markers (after a barrier across every machine), the adapter and the manifest fields.

Nothing here imports torch at module level: preflight uses the checks.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks import atomic
from tasks.config import RunConfig
from tasks.errors import StageFailedError
from tasks.gpus import GpuInfo, visible_gpus
from tasks.serving import free_port

log = logging.getLogger("loraflow.train")

# The run config reaches every process through the environment (accelerate launch passes it on).
RUN_CONFIG_ENV = "LORAFLOW_RUN_CONFIG"
# Each process dies with its parent; the pid says which parent, so a child that was orphaned
# before it could ask for that exits at once.
PARENT_PID_ENV = "LORAFLOW_PARENT_PID"
# Files in the train stage's work directory through which the task and its processes talk.
LAUNCH_INPUTS = "launch_inputs.json"
TRAIN_RESULT = "train_result.json"
# torchrun's default rendezvous port, for machines that must agree on one without being told.
DEFAULT_MAIN_PROCESS_PORT = 29500
_OUTPUT_TAIL_LINES = 100
_POLL_SECONDS = 0.5

# DeepSpeed JSON keys the Trainer fills from its own arguments when they are "auto", and rejects
# (after loading the model) when they differ: (JSON key, config key, value from the config).
_DEEPSPEED_MATCHES: tuple[tuple[str, str, Any], ...] = (
    ("train_micro_batch_size_per_gpu", "micro_batch_size", lambda cfg, n: cfg.micro_batch_size),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", lambda cfg, n: cfg.gradient_accumulation_steps),
    ("train_batch_size", "micro_batch_size x gradient_accumulation_steps x processes",
     lambda cfg, n: cfg.micro_batch_size * cfg.gradient_accumulation_steps * n),
    ("gradient_clipping", "max_grad_norm", lambda cfg, n: cfg.max_grad_norm),
    ("optimizer.params.lr", "learning_rate", lambda cfg, n: cfg.learning_rate),
    ("optimizer.params.weight_decay", "weight_decay", lambda cfg, n: cfg.weight_decay),
    ("scheduler.params.warmup_max_lr", "learning_rate", lambda cfg, n: cfg.learning_rate),
    ("bf16.enabled", "bf16", lambda cfg, n: cfg.bf16),
    ("fp16.enabled", "bf16 (loraflow trains in bf16 or fp32, never fp16)", lambda cfg, n: False),
)


class LaunchError(StageFailedError):
    """The launched training processes failed; the message holds their exit status and last output."""


@dataclass(frozen=True)
class ProcessPlan:
    """How many processes train (on all machines together: the world size), and how they share the work."""

    processes: int
    strategy: Literal["single", "ddp", "deepspeed", "fsdp"]
    machines: int = 1

    @property
    def launched(self) -> bool:
        return self.strategy != "single"

    @property
    def per_machine(self) -> int:
        """Processes (and GPUs, on a GPU host) on each machine."""
        return self.processes // self.machines


def plan_processes(cfg: RunConfig, gpus: list[GpuInfo] | None = None) -> ProcessPlan:
    """`num_processes` (all machines together), else one process per visible GPU (one on a CPU) on
    each of `num_machines`. On a Ray cluster (`ray:`), `num_processes` or one: the machine that
    plans (and keys) the stage is not the one that trains, and Ray gives the train task as many
    GPUs as this plan has processes."""
    if cfg.ray is not None:
        processes = cfg.num_processes or 1
    else:
        gpus = visible_gpus() if gpus is None else gpus
        processes = cfg.num_processes or max(1, len(gpus)) * cfg.num_machines
    if cfg.deepspeed:
        return ProcessPlan(processes, "deepspeed", cfg.num_machines)
    if cfg.fsdp_config is not None:
        return ProcessPlan(processes, "fsdp", cfg.num_machines)
    return ProcessPlan(processes, "ddp" if processes > 1 else "single", cfg.num_machines)


def machine_problems(cfg: RunConfig) -> list[str]:
    """Multi-node settings that cannot work together, each with its fix."""
    problems = []
    if cfg.machine_rank >= cfg.num_machines:
        problems.append(
            f"`machine_rank` {cfg.machine_rank} but `num_machines` {cfg.num_machines}: ranks run from 0 to {cfg.num_machines - 1}; "
            "give each machine its own (LORAFLOW_MACHINE_RANK)"
        )
    if cfg.num_machines > 1 and not cfg.main_process_ip:
        problems.append(
            f"`num_machines` {cfg.num_machines} needs `main_process_ip`: the address of machine 0 that the others reach "
            "(or LORAFLOW_MAIN_PROCESS_IP)"
        )
    if cfg.num_processes and cfg.num_processes % cfg.num_machines:
        problems.append(
            f"`num_processes` {cfg.num_processes} counts the processes of all {cfg.num_machines} machines and must divide "
            f"evenly among them; set num_processes to a multiple of {cfg.num_machines}"
        )
    return problems


def read_deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON named by `deepspeed`, as a dict; ValueError naming the file when it is not one.
    Read once per process while the file is unchanged (keys, preflight and zero_stage all ask)."""
    path = Path(cfg.deepspeed or "")
    try:
        stat = path.stat()
    except OSError as error:
        raise ValueError(f"`deepspeed`: cannot read {path}: {error.strerror}") from None
    return dict(_read_deepspeed_json(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _read_deepspeed_json(path_text: str, mtime_ns: int, size: int) -> dict[str, Any]:
    path = Path(path_text)
    try:
        settings = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"`deepspeed`: cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise ValueError(f"`deepspeed`: {path} is not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"`deepspeed`: {path} must hold a JSON object")
    return settings


def deepspeed_problems(cfg: RunConfig, processes: int) -> list[str]:
    """What the Trainer would reject only after loading the model: values in the DeepSpeed JSON that
    contradict this config, and a ZeRO stage that does not exist."""
    try:
        settings = read_deepspeed_config(cfg)
    except ValueError as error:
        return [str(error)]
    problems = []
    zero = settings.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"`deepspeed` {cfg.deepspeed}: zero_optimization.stage is {stage!r}; use 2 or 3 (ZeRO-2 / ZeRO-3)")
    # DeepSpeed's field is gather_16bit_weights_on_model_save; the stage3_ name is its older alias.
    gather = zero.get("gather_16bit_weights_on_model_save", zero.get("stage3_gather_16bit_weights_on_model_save"))
    if stage == 3 and gather is not True:
        problems.append(
            f"`deepspeed` {cfg.deepspeed}: ZeRO-3 without zero_optimization.gather_16bit_weights_on_model_save: true "
            "(older name: stage3_gather_16bit_weights_on_model_save: true) cannot save the adapter as safetensors; set it to true"
        )
    for dotted, config_key, expected in _DEEPSPEED_MATCHES:
        value: Any = settings
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        wanted = expected(cfg, processes)
        if value is None or value == "auto" or value == wanted:
            continue
        problems.append(
            f"`deepspeed` {cfg.deepspeed}: {dotted} is {value!r} but {config_key} is {wanted!r} here; "
            f'set it to "auto" in the JSON (filled from this config) or make them equal'
        )
    return problems


def zero_stage(cfg: RunConfig) -> int | None:
    return read_deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0) if cfg.deepspeed else None


def launch_command(cfg: RunConfig, plan: ProcessPlan, worker_args: list[str], port: int) -> list[str]:
    """`accelerate launch` for `plan`, running `tasks.train_worker` with `worker_args` in every process.

    torchrun starts the processes either way; the Trainer configures DDP, FSDP and DeepSpeed itself
    from its arguments. DeepSpeed goes through accelerate's DeepSpeed launcher, which also serves a
    single process (ZeRO-Offload on one GPU). Across machines, `--num_processes` counts all of them
    (accelerate starts `processes / machines` here) and machine 0 at `main_process_ip:port` gathers
    the others. One process without DeepSpeed (a job holding one GPU of several) runs as a plain child.
    """
    command = [
        "--num_processes", str(plan.processes), "--num_machines", str(plan.machines), "--main_process_port", str(port),
        "--mixed_precision", "bf16" if cfg.bf16 else "no", "--dynamo_backend", "no",
    ]
    if plan.machines > 1:
        command += ["--machine_rank", str(cfg.machine_rank), "--main_process_ip", str(cfg.main_process_ip)]
    if plan.strategy == "deepspeed":
        command += ["--use_deepspeed", "--deepspeed_config_file", str(Path(cfg.deepspeed or "").resolve())]
        if plan.machines > 1:  # torchrun on each machine, as for DDP (accelerate's default, pdsh, needs ssh between hosts)
            command += ["--deepspeed_multinode_launcher", "standard"]
    elif plan.launched:
        command += ["--multi_gpu"]
    return [sys.executable, "-m", "tasks.launch", *command, "-m", "tasks.train_worker", *worker_args]


def run_launched(cfg: RunConfig, plan: ProcessPlan, work_dir: Path, prep_manifest: dict[str, Any],
                 callbacks: list[Any], devices: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Starts the training processes and waits for them, relaying their progress to `callbacks`
    (Trainer callbacks living in this process) and their output to the log; returns the main
    process's manifest fields (None on a machine other than machine 0, whose processes are not the
    main one). `devices`: the environment naming the GPUs this job holds (`tasks.gpu_allocator`)."""
    from tasks.progress import PROGRESS_FILE, ProgressReplay

    main_machine = cfg.machine_rank == 0
    if main_machine:
        # A killed run's files: the replay must wait for this run's, and the result must be this run's.
        (work_dir / PROGRESS_FILE).unlink(missing_ok=True)
        (work_dir / TRAIN_RESULT).unlink(missing_ok=True)
    atomic.write_json(work_dir / LAUNCH_INPUTS, {"prep": prep_manifest})
    port = cfg.main_process_port or (free_port() if plan.machines == 1 else DEFAULT_MAIN_PROCESS_PORT)
    command = launch_command(cfg, plan, [str(work_dir)], port)
    environment = {**os.environ, **(devices or {}), RUN_CONFIG_ENV: cfg.model_dump_json(), PARENT_PID_ENV: str(os.getpid())}
    where = f" ({plan.per_machine} on machine {cfg.machine_rank} of {plan.machines})" if plan.machines > 1 else ""
    on_gpus = f" on GPU {devices['CUDA_VISIBLE_DEVICES']}" if devices else ""
    what = f"{plan.processes} {plan.strategy.upper()} processes" if plan.launched else "1 process"
    log.info("train: launching %s%s%s", what, where, on_gpus)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    output: queue.Queue[str | None] = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    reader = threading.Thread(target=_read_lines, args=(process.stdout, output), daemon=True)
    reader.start()
    replay = ProgressReplay(work_dir, callbacks)
    try:
        finished = False
        while not finished:
            try:
                line = output.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                line = ""
            # Logged from this thread: Prefect ties log lines to the task run through its context.
            while line is not None:
                if line:
                    tail.append(line)
                    log.info("train process: %s", line)
                try:
                    line = output.get_nowait()
                except queue.Empty:
                    break
            finished = line is None
            replay.poll()
        returncode = process.wait()
    finally:
        if process.poll() is None:  # this task was interrupted: take the training processes down with it
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if returncode != 0:
        raise LaunchError(
            f"the {plan.processes} training processes failed (accelerate launch exited with {returncode}); "
            "a re-run resumes from the last complete checkpoint. Last output:\n" + "\n".join(tail)
        )
    replay.finish()
    if not main_machine:
        return None
    try:
        return json.loads((work_dir / TRAIN_RESULT).read_text())
    except FileNotFoundError:
        raise LaunchError(f"the training processes exited cleanly but the main one wrote no {work_dir / TRAIN_RESULT}") from None


def _read_lines(stream: Any, output: queue.Queue[str | None]) -> None:
    for line in stream:
        output.put(line.rstrip("\n"))
    output.put(None)


def die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (torchrun starts workers in their
    own sessions, so a killed launcher would otherwise leave them training)."""
    expected_parent = int(os.environ[PARENT_PID_ENV])
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != expected_parent:  # the parent died before the request took effect
        os._exit(1)


def _launcher(arguments: list[str]) -> None:
    """`accelerate launch` itself, in a process that dies with the train task and that its workers die with."""
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser

    die_with_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    accelerate_launch(launch_command_parser().parse_args(arguments))


if __name__ == "__main__":
    _launcher(sys.argv[1:])
