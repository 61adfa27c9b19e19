"""The real pipeline on a GPU: every GPU path through the stages, and 8B throughput of the Trainer vs the loop.

Run through `benchmarks/gpu_pipeline.sh` (it prepares the interpreter and the time limits):

    bash benchmarks/gpu_pipeline.sh             # on a CUDA GPU: at most 9 minutes on an H200
    bash benchmarks/gpu_pipeline.sh --dry-run   # the same steps on the tiny model, on a CPU

Checks, in this order (a later one is skipped when the time budget, `--budget-s`, is spent):

- `base_model`: the tiny model (`loraflow tiny-model`, whose locally trained tokenizer every model
  here uses); on a GPU also a random-weight Llama-3.2-1B-shaped model (about 1B parameters) saved in
  bf16, and, in the background, a Llama-3-8B-shaped one for the throughput checks.
- `validate`: `loraflow validate CONFIG` passes and prints its memory estimate (`tasks/memory.py`).
- `pipeline`: the whole pipeline on the ~1B model: QLoRA in bf16, `attn_implementation: auto`,
  `optimizer: paged_adamw_8bit`, eval through vLLM with the adapter when vLLM is installed (else
  `transformers serve`), a verified merge in export. Three invocations in one process:
  `loraflow run CONFIG --only prep`, `--only train` (so that the peak GPU memory of training is
  measured alone, `torch.cuda.max_memory_allocated`, and compared with the estimate), then the plain
  `loraflow run CONFIG`, in which prep and train must come back cached.
- `zero2`, `zero3`: the train stage alone (`--only train`) with `deepspeed: configs/deepspeed/zero2.json`
  / `zero3.json` in one process (`accelerate launch` with DeepSpeed), a few steps.
- `loop_compile_8b`: `benchmarks/gpu_train.py` (the standalone loop), flex attention then regional
  `torch.compile`, on the Llama-3-8B shape at 4096 tokens a row.
- `trainer_compile_8b`: the same shape, LoRA settings and row length through the train stage (the
  transformers Trainer) with `torch_compile: true`, on samples with the loop's length distribution;
  tokens/s and MFU from its per-step metrics, leaving out the first steps (compilation).

In `--dry-run` (CPU) the GPU-only settings are replaced by their CPU equivalents: fp32 instead of bf16,
`adamw_torch` instead of the paged 8-bit optimizer, `transformers serve` instead of vLLM, SDPA,
`torch_compile` off (compiling takes minutes on a CPU) and the tiny model instead of the 1B and 8B
shapes; the DeepSpeed checks are skipped ("needs a GPU").

Output: `gpu_pipeline.json` and `gpu_pipeline.log` (every command's output) under `--out`, and as the
last line on stdout one JSON object: per check its status (`ok`, `failed` with `error`, `skipped` with
`reason`), seconds, stage times, losses, tokens/s, MFU, peak memory and the memory estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu_pipeline_figures import (
    attention_flops_per_token,
    compare_memory,
    median,
    memory_estimate,
    non_embedding_parameters,
    read_summary,
    stage_dir,
    train_figures,
)
from benchmarks.gpu_pipeline_inputs import (
    QUICKSTART_DATA,
    REPO,
    TRAINER_WARMUP_STEPS,
    main_build_model,
    pipeline_overrides,
    throughput_overrides,
    write_config,
    write_length_matched_data,
)

DEEPSPEED_DIR = REPO / "configs" / "deepspeed"
CHECKS = ("base_model", "validate", "pipeline", "zero2", "zero3", "loop_compile_8b", "trainer_compile_8b")
# What the dry run uses instead of the GPU settings (reported in its JSON).
DRY_RUN_REPLACEMENTS = {
    "base_model": "the tiny model (loraflow tiny-model) instead of the ~1B and 8B shapes",
    "adapter": "lora instead of qlora: bitsandbytes' 4-bit layers train at about 200 tokens/s on a CPU",
    "bf16": "fp32 (bf16: false, tf32: false)",
    "optimizer": "adamw_torch instead of paged_adamw_8bit (bitsandbytes' paged optimizers need CUDA)",
    "attn_implementation": "auto resolves to SDPA on a CPU",
    "eval.endpoint": "local (transformers serve) instead of vLLM",
    "torch_compile": "off: compiling takes minutes on a CPU",
    "deepspeed": "the ZeRO-2/3 checks are skipped: DeepSpeed needs CUDA",
}
# Rough seconds each check needs on an H200 (a check starts only when this much budget is left), and the
# most it may take.
GPU_NEEDS_S = {
    "base_model": 60, "validate": 10, "pipeline": 150, "zero2": 60, "zero3": 60, "loop_compile_8b": 90, "trainer_compile_8b": 150,
}
GPU_CAPS_S = {
    "base_model": 120, "validate": 30, "pipeline": 240, "zero2": 120, "zero3": 120, "loop_compile_8b": 150, "trainer_compile_8b": 260,
}
MEMORY_FILE = "peaks.json"
LOG_TAIL_LINES = 400


class StepFailed(Exception):
    """A check failed; the message says what and where its output is."""


class Runner:
    """Runs the checks' commands: one log for all of them, a deadline, and no child left behind."""

    def __init__(self, out_dir: Path, work_dir: Path, dry_run: bool, budget_s: float) -> None:
        self.out_dir, self.work_dir, self.dry_run = out_dir, work_dir, dry_run
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.log_path = out_dir / "gpu_pipeline.log"
        self.log_path.write_text("")
        self.child: subprocess.Popen | None = None
        self.current: str | None = None  # the check running now
        self.background: list[subprocess.Popen] = []
        self.environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(work_dir / "prefect"),
            # A busy machine starts the ephemeral Prefect server slowly the first time (STACK-NOTES).
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }
        self.environment.pop("PREFECT_API_URL", None)
        if dry_run:  # the CPU path, also on a machine with a GPU
            self.environment["CUDA_VISIBLE_DEVICES"] = ""

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def run(self, name: str, argv: list[str], timeout: float) -> str:
        """Runs `argv` from the repository root; returns its output. StepFailed on a non-zero exit or timeout."""
        timeout = max(1.0, min(timeout, self.remaining()))
        self.log(f"\n=== {name}: {' '.join(argv)} (timeout {timeout:.0f} s)")
        started = time.monotonic()
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as output:
            self.child = subprocess.Popen(
                argv, cwd=REPO, env=self.environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode: int | None = self.child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                stop_process_group(self.child)
                self.child = None
            output.seek(0)
            text = output.read()
        lines = text.splitlines()
        shown = lines[-LOG_TAIL_LINES:]
        if len(lines) > len(shown):
            shown.insert(0, f"[... {len(lines) - len(shown)} earlier lines left out]")
        self.log("\n".join(shown) + f"\n=== {name}: exit {returncode} after {time.monotonic() - started:.1f} s")
        if returncode is None:
            raise StepFailed(f"{name}: no result within {timeout:.0f} s (output in gpu_pipeline.log)")
        if returncode != 0:
            raise StepFailed(f"{name}: exit code {returncode}: {last_error_line(lines)} (output in gpu_pipeline.log)")
        return text

    def start_background(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = (self.work_dir / f"{name}.log").open("w")
        process = subprocess.Popen(
            argv, cwd=REPO, env=self.environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        self.background.append(process)
        return process

    def wait_background(self, name: str, process: subprocess.Popen, timeout: float) -> None:
        try:
            returncode = process.wait(timeout=max(1.0, min(timeout, self.remaining())))
        except subprocess.TimeoutExpired:
            returncode = None
        text = (self.work_dir / f"{name}.log").read_text(errors="replace")
        self.log(f"\n=== {name} (background)\n" + "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) + f"\n=== {name}: exit {returncode}")
        if returncode != 0:
            stop_process_group(process)
            raise StepFailed(f"{name}: {'not finished in time' if returncode is None else f'exit code {returncode}'}: "
                             f"{last_error_line(text.splitlines())}")

    def stop_all(self) -> None:
        for process in [self.child, *self.background]:
            if process is not None:
                stop_process_group(process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (servers and launched workers included), SIGKILL after 10 s;
    a group whose leader already exited is killed outright (a server it started may outlive it)."""
    from tasks.serving import stop_process_group as stop_group

    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    stop_group(process)


def last_error_line(lines: list[str]) -> str:
    """The most telling line of a failed command's output: the last one naming an error, else the last one
    (lines of the run summary's table are left out: they cut messages into cells)."""
    for line in reversed(lines):
        if re.search(r"(Error|error:|Exception|Traceback|Killed|failed)", line) and not re.search("[\u2500-\u257f]", line):
            return line.strip()[:400]
    return (lines[-1].strip() if lines else "no output")[:400]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "vllm", "flash_attn",
                    "liger_kernel", "prefect", "great_expectations"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def gpu_name() -> str | None:
    from tasks.gpus import visible_gpus

    gpus = visible_gpus()
    return gpus[0].name if gpus else None


def ensure_console_scripts() -> list[str]:
    """`transformers serve`, `vllm serve` and `prefect server` are started from next to the interpreter
    (tasks/serving.py, flows/ops_cli.py). In a venv over an image's packages those scripts live
    elsewhere: write the missing ones."""
    if sys.prefix == sys.base_prefix:
        return []
    written = []
    scripts = {entry.name: entry for entry in importlib.metadata.entry_points(group="console_scripts")}
    for name in ("transformers", "vllm", "accelerate", "prefect"):
        target = Path(sys.executable).with_name(name)
        if target.exists() or name not in scripts:
            continue
        module, _, function = scripts[name].value.partition(":")
        target.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        target.chmod(0o755)
        written.append(str(target))
    return written


# --- the checks ---------------------------------------------------------------------------------


class Checks:
    """The checks in order; each returns its figures, or raises StepFailed."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.work = runner.work_dir
        self.dry_run = runner.dry_run
        self.tiny_dir = self.work / "models" / "tiny-llama"
        self.model_1b = self.work / "models" / "llama-1b"
        self.model_8b = self.work / "models" / "llama3-8b"
        self.model_8b_build: subprocess.Popen | None = None
        self.endpoint = "vllm" if not self.dry_run and importlib.util.find_spec("vllm") is not None else "local"
        self.pipeline: dict[str, Any] = {}
        self.prefect_server: subprocess.Popen | None = None
        self.prefect: dict[str, Any] = {}
        self.zero3_run: subprocess.Popen | None = None

    @property
    def python(self) -> str:
        return sys.executable

    def start_prefect_server(self) -> None:
        """`loraflow server` on a free port, started first: every `loraflow run` after it talks to this one
        server instead of starting a temporary one of its own (15-30 s each on a busy machine)."""
        port = free_port()
        self.prefect_url = f"http://127.0.0.1:{port}/api"
        self.prefect_server = self.runner.start_background(
            "prefect-server", [self.python, "-m", "flows.cli", "server", "--port", str(port)]
        )
        self.prefect_started = time.monotonic()

    def use_prefect_server(self) -> dict[str, Any]:
        """Waits for the server's /health; without it, runs fall back to Prefect's temporary servers."""
        if self.prefect_server is None or "PREFECT_API_URL" in self.runner.environment:
            return self.prefect
        deadline = time.monotonic() + min(120.0, self.runner.remaining())
        while time.monotonic() < deadline and self.prefect_server.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.prefect_url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.runner.environment["PREFECT_API_URL"] = self.prefect_url
                        self.prefect.update(api_url=self.prefect_url, ready_after_s=round(time.monotonic() - self.prefect_started, 1))
                        return self.prefect
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.prefect.update(api_url=None, note="loraflow server did not become healthy: each run starts a temporary server")
        self.runner.log("prefect-server: not healthy; falling back to temporary servers")
        self.prefect_server = None
        return self.prefect

    def loraflow(self, name: str, invocations: list[list[str]], timeout: float) -> list[dict[str, Any]]:
        """`loraflow` commands run one after the other in one process (imports once), each with the peak
        GPU memory it allocated."""
        self.runner.run(name, self.loraflow_argv(name, invocations), timeout)
        peaks = self.work / f"{name}-{MEMORY_FILE}"
        return json.loads(peaks.read_text()) if peaks.is_file() else []

    def loraflow_argv(self, name: str, invocations: list[list[str]]) -> list[str]:
        if any(invocation[0] == "run" for invocation in invocations):
            self.use_prefect_server()
        argv = [self.python, "-m", "benchmarks.gpu_pipeline", "loraflow", "--peaks", str(self.work / f"{name}-{MEMORY_FILE}")]
        for invocation in invocations:
            argv += ["--", *invocation]
        return argv

    # base_model
    def base_model(self) -> dict[str, Any]:
        self.console_scripts_written = ensure_console_scripts()
        self.start_prefect_server()
        self.loraflow("tiny-model", [["tiny-model", str(self.tiny_dir), "--corpus", str(QUICKSTART_DATA)]], 120)
        figures: dict[str, Any] = {"tiny_model": str(self.tiny_dir), "console_scripts_written": self.console_scripts_written}
        if self.dry_run:
            figures["pipeline_model"] = figures["throughput_model"] = "tiny (loraflow tiny-model; the 1B and 8B shapes need a GPU)"
            return figures
        # The 8B model (16 GB in bf16) is built on the CPU and written while the checks before it run.
        self.model_8b_build = self.runner.start_background("build-8b", [
            self.python, "-m", "benchmarks.gpu_pipeline", "build-model", "--shape", "llama3-8b",
            "--tokenizer", str(self.tiny_dir), "--device", "cpu", str(self.model_8b),
        ])
        output = self.runner.run("build-1b", [
            self.python, "-m", "benchmarks.gpu_pipeline", "build-model", "--shape", "llama-1b",
            "--tokenizer", str(self.tiny_dir), "--device", "cuda", str(self.model_1b),
        ], GPU_CAPS_S["base_model"])
        figures["pipeline_model"] = json.loads(output.strip().splitlines()[-1])
        return figures

    def wait_for_8b_model(self) -> None:
        """The background build must be done before a timing starts: it competes for the CPU and the disk."""
        if self.model_8b_build is not None:
            build, self.model_8b_build = self.model_8b_build, None
            self.runner.wait_background("build-8b", build, GPU_CAPS_S["trainer_compile_8b"])

    def pipeline_model(self) -> Path:
        return self.tiny_dir if self.dry_run else self.model_1b

    def pipeline_config(self) -> tuple[Path, dict[str, Any]]:
        data = QUICKSTART_DATA
        if self.dry_run:  # 300 of the 3,000 headlines: prep and eval in seconds on two cores
            data = self.work / "quickstart-300.jsonl"
            if not data.exists():
                data.write_text("".join(QUICKSTART_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
        overrides = pipeline_overrides(self.work, self.pipeline_model(), data, self.dry_run, self.endpoint)
        return write_config(self.work / "configs" / "pipeline.yaml", **overrides), overrides

    # validate
    def validate(self) -> dict[str, Any]:
        config, _ = self.pipeline_config()
        output = self.runner.run("validate", [self.python, "-m", "flows.cli", "validate", str(config)], GPU_CAPS_S["validate"])
        printed = re.search(r"estimated peak GPU memory: ([0-9.]+) GB", output)
        return {
            "config": str(config),
            "printed_estimate_gb": float(printed.group(1)) if printed else None,
            "memory_estimate": memory_estimate(config),
        }

    # pipeline
    def run_pipeline(self) -> dict[str, Any]:
        config, overrides = self.pipeline_config()
        runs = self.loraflow("pipeline", [
            ["run", str(config), "--only", "prep"], ["run", str(config), "--only", "train"], ["run", str(config)],
        ], GPU_CAPS_S["pipeline"])
        failed = [run for run in runs if run["exit_code"] != 0]
        if failed or len(runs) < 3:
            raise StepFailed(f"pipeline: `loraflow {' '.join(failed[0]['args']) if failed else 'run'}` did not finish")
        summary = read_summary(overrides)
        states = {stage: outcome["state"] for stage, outcome in summary["stages"].items()}
        train = train_figures(overrides, summary)
        records = train.pop("records")
        export_dir = stage_dir(overrides, "export", summary["stages"]["export"]["fingerprint"])
        verification = json.loads((export_dir / "manifest.json").read_text())["verification"]
        estimate = memory_estimate(config)
        figures = {
            "config": str(config),
            "seconds_per_invocation": {" ".join(["run", *run["args"][3:]]): run["seconds"] for run in runs},
            "stage_seconds": {
                "prep": runs[0]["stage_seconds"].get("prep"),
                "train": runs[1]["stage_seconds"].get("train"),
                "eval": runs[2]["stage_seconds"].get("eval"),
                "export": runs[2]["stage_seconds"].get("export"),
            },
            "whole_run_states": states,
            "cached_upstream": states.get("prep") == "cached" and states.get("train") == "cached",
            "train": train,
            "train_tokens_per_s": median([record["tokens_per_second"] for record in records if "tokens_per_second" in record]),
            "eval_endpoint": self.endpoint,
            "eval": summary["eval"],
            "merge": {
                "merge_dtype": verification["merge_dtype"],
                "max_logit_diff": verification["max_logit_diff"],
                "tolerance": verification["tolerance"],
                "within_tolerance": verification["max_logit_diff"] <= verification["tolerance"],
                "generations_match": verification["generations_match"],
                "weights_changed": verification["weights_changed"],
            },
            "peak_memory_gb": {"train": runs[1]["peak_memory_gb"], "eval_export": runs[2]["peak_memory_gb"]},
            "peak_rss_gb": max(run["peak_rss_gb"] for run in runs),
            **compare_memory(runs[1]["peak_memory_gb"], estimate),
        }
        if states != {"prep": "cached", "train": "cached", "eval": "ran", "export": "ran"}:
            raise StepFailed(f"pipeline: the whole run's stages were {states}, expected prep and train cached, eval and export ran")
        if not train["losses_finite"]:
            raise StepFailed(f"pipeline: non-finite training loss: {train['losses']}")
        self.pipeline = {"config": config, "overrides": overrides}
        return figures

    # zero2 / zero3
    def zero(self, stage: int) -> dict[str, Any]:
        """The train stage alone under ZeRO-`stage`. Both ZeRO runs are functional checks, not timings, so
        the ZeRO-2 check starts the ZeRO-3 run beside its own and the ZeRO-3 check collects it."""
        if self.dry_run:
            raise SkipCheck("needs a GPU: DeepSpeed ZeRO runs on CUDA only (tasks/memory.py refuses it without one)")
        if not self.pipeline:
            raise SkipCheck("the pipeline check did not publish the prep output this train stage reads")
        if importlib.util.find_spec("deepspeed") is None:
            raise StepFailed("deepspeed is not installed (carry its wheel; see benchmarks/RESULTS.md)")
        name = f"zero{stage}"
        if stage == 2 and self.runner.remaining() > GPU_NEEDS_S["zero2"] + GPU_NEEDS_S["zero3"]:
            self.zero3_run = self.runner.start_background("zero3", self.loraflow_argv("zero3", [self.zero_invocation(3)]))
        if stage == 3 and self.zero3_run is not None:
            self.runner.wait_background("zero3", self.zero3_run, GPU_CAPS_S["zero3"])
            runs = json.loads((self.work / f"zero3-{MEMORY_FILE}").read_text())
        else:
            runs = self.loraflow(name, [self.zero_invocation(stage)], GPU_CAPS_S[name])
        if not runs or runs[0]["exit_code"] != 0:
            raise StepFailed(f"{name}: `loraflow run --only train` did not finish")
        overrides = self.zero_overrides(stage)
        train = train_figures(overrides, read_summary(overrides))
        train.pop("records")
        if not train["losses_finite"]:
            raise StepFailed(f"{name}: non-finite training loss: {train['losses']}")
        return {
            "config": str(self.work / "configs" / f"{name}.yaml"),
            "ran_beside_zero2": stage == 3 and self.zero3_run is not None,
            "train_seconds": runs[0]["stage_seconds"].get("train"),
            "train": train,
            # Training ran in the launched worker: this process's allocator saw none of it.
            **compare_memory(None, memory_estimate(self.work / "configs" / f"{name}.yaml")),
        }

    def zero_overrides(self, stage: int) -> dict[str, Any]:
        return {
            **self.pipeline["overrides"],
            "name": f"gpu-zero{stage}",
            "deepspeed": str(DEEPSPEED_DIR / f"zero{stage}.json"),
            "num_processes": 1,
            # DeepSpeed takes the Trainer's optimizer; the plain one keeps this check about ZeRO.
            "optimizer": "adamw_torch",
            "max_steps": 6,
            "save_steps": None,
            "output_dir": str(self.work / "outputs" / f"zero{stage}"),
        }

    def zero_invocation(self, stage: int) -> list[str]:
        config = write_config(self.work / "configs" / f"zero{stage}.yaml", **self.zero_overrides(stage))
        return ["run", str(config), "--only", "train"]

    # loop_compile_8b
    def loop_compile(self) -> dict[str, Any]:
        results = self.runner.out_dir / "gpu_train.md"
        self.wait_for_8b_model()
        if self.dry_run:
            arguments = ["--tiny", "--variants", "packed", "--steps", "2", "--warmup", "1"]
        else:
            budget = max(30.0, min(GPU_CAPS_S["loop_compile_8b"], self.runner.remaining()) - 70)
            arguments = ["--variants", "packed_flex,packed_compile", "--compile", "--budget-s", f"{budget:.0f}"]
        output = self.runner.run(
            "loop_compile_8b", [self.python, "-m", "benchmarks.gpu_train", *arguments, "--results", str(results)],
            GPU_CAPS_S["loop_compile_8b"],
        )
        report = json.loads(output.strip().splitlines()[-1])
        variants = report["variants"]
        best = "packed" if self.dry_run else "packed_compile"
        chosen = variants.get(best, {})
        if chosen.get("status") != "ok":
            raise StepFailed(f"loop_compile_8b: variant {best} {chosen.get('status')}: {chosen.get('error')}")
        return {
            "variant": best,
            "useful_tokens_per_s": chosen["useful_tokens_per_s"],
            "mfu": chosen["mfu"],
            "peak_memory_gb": chosen["peak_memory_gb"],
            **{key: chosen[key] for key in ("loss_first", "loss_last", "losses_finite", "step_s")},
            "variants": {name: {key: figures.get(key) for key in ("status", "useful_tokens_per_s", "mfu", "peak_memory_gb", "error")}
                         for name, figures in variants.items()},
            "model": report["model"],
            "phases_s": report["phases_s"],
        }

    # trainer_compile_8b
    def trainer_compile(self) -> dict[str, Any]:
        model_dir = self.tiny_dir if self.dry_run else self.model_8b
        self.wait_for_8b_model()
        data = self.work / "length-matched.jsonl"
        write_length_matched_data(data, self.tiny_dir, self.dry_run, samples=60 if self.dry_run else 240)
        overrides = throughput_overrides(self.work, model_dir, data, self.dry_run)
        config = write_config(self.work / "configs" / "throughput.yaml", **overrides)
        runs = self.loraflow("trainer_compile_8b", [["run", str(config), "--only", "prep"], ["run", str(config), "--only", "train"]],
                             GPU_CAPS_S["trainer_compile_8b"])
        if len(runs) < 2 or any(run["exit_code"] != 0 for run in runs):
            raise StepFailed("trainer_compile_8b: `loraflow run --only prep/train` did not finish")
        summary = read_summary(overrides)
        train = train_figures(overrides, summary)
        records = [record for record in train.pop("records") if "tokens_per_second" in record]
        timed = [record for record in records if record["step"] > TRAINER_WARMUP_STEPS]
        if not timed:
            raise StepFailed(f"trainer_compile_8b: no per-step tokens/s after step {TRAINER_WARMUP_STEPS} in metrics.jsonl")
        # Each record covers one step (logging_steps 1): its tokens over its seconds.
        previous = {record["step"]: record["num_input_tokens_seen"] for record in records}
        timed_tokens = sum(record["num_input_tokens_seen"] - previous.get(record["step"] - 1, 0) for record in timed)
        timed_seconds = sum((record["num_input_tokens_seen"] - previous.get(record["step"] - 1, 0)) / record["tokens_per_second"]
                            for record in timed)
        tokens_per_s = timed_tokens / timed_seconds
        model_config = json.loads((model_dir / "config.json").read_text())
        prep_dir = stage_dir(overrides, "prep", summary["stages"]["prep"]["fingerprint"])
        prep_manifest = json.loads((prep_dir / "manifest.json").read_text())
        flops_per_token = 4 * non_embedding_parameters(model_config) + attention_flops_per_token(prep_dir, prep_manifest, model_config)
        if self.dry_run:
            peak = None
        else:
            from benchmarks.gpu_train import peak_tflops

            peak = peak_tflops(gpu_name())
        return {
            "config": str(config),
            "torch_compile": overrides["torch_compile"],
            **({"replaced": "torch_compile off on a CPU (compiling takes minutes there)"} if self.dry_run else {}),
            "warmup_steps_left_out": TRAINER_WARMUP_STEPS,
            "timed_steps": len(timed),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(flops_per_token * tokens_per_s / (peak * 1e12), 4) if peak else None,
            "flops_per_token": flops_per_token,
            "packing_efficiency": prep_manifest.get("packing_efficiency"),
            "train_seconds": runs[1]["stage_seconds"].get("train"),
            "train": train,
            "peak_memory_gb": runs[1]["peak_memory_gb"],
            **compare_memory(runs[1]["peak_memory_gb"], memory_estimate(config)),
        }


class SkipCheck(Exception):
    """A check that cannot run here; the message is the reason."""


# --- the driver ---------------------------------------------------------------------------------


def run_checks(runner: Runner, report: dict[str, Any], save: Callable[[], None]) -> None:
    checks = Checks(runner)
    report["prefect"] = checks.prefect
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("base_model", checks.base_model),
        ("validate", checks.validate),
        ("pipeline", checks.run_pipeline),
        ("zero2", lambda: checks.zero(2)),
        ("zero3", lambda: checks.zero(3)),
        ("loop_compile_8b", checks.loop_compile),
        ("trainer_compile_8b", checks.trainer_compile),
    ]
    for name, step in steps:
        needed = 0 if runner.dry_run else GPU_NEEDS_S[name]
        if report["checks"]["base_model"].get("status") == "failed" and name != "base_model":
            report["checks"][name] = {"status": "skipped", "reason": "the base models were not built"}
        elif runner.remaining() < needed:
            reason = f"time budget: {runner.remaining():.0f} s left, needs about {needed} s"
            report["checks"][name] = {"status": "skipped", "reason": reason}
        else:
            started = time.monotonic()
            runner.current = name
            print(f"[check] {name} ...", flush=True)
            try:
                report["checks"][name] = {"status": "ok", **step()}
            except SkipCheck as reason:
                report["checks"][name] = {"status": "skipped", "reason": str(reason)}
            except StepFailed as error:
                report["checks"][name] = {"status": "failed", "error": str(error)}
            except Exception as error:  # a check that breaks is a result; the next check still runs
                report["checks"][name] = {"status": "failed", "error": f"{type(error).__name__}: {str(error)[:500]}"}
            runner.current = None
            report["checks"][name]["seconds"] = round(time.monotonic() - started, 1)
            print(f"[check] {name}: {report['checks'][name]['status']} in {report['checks'][name]['seconds']} s", flush=True)
        save()
    trainer, loop = report["checks"]["trainer_compile_8b"], report["checks"]["loop_compile_8b"]
    if trainer.get("status") == "ok" and loop.get("status") == "ok":
        report["comparison"] = {
            "trainer_tokens_per_s": trainer["tokens_per_s"],
            "loop_useful_tokens_per_s": loop["useful_tokens_per_s"],
            "trainer_over_loop": round(trainer["tokens_per_s"] / loop["useful_tokens_per_s"], 3),
            "trainer_mfu": trainer["mfu"],
            "loop_mfu": loop["mfu"],
            "mfu_target": 0.45,
        }


def main_driver(args: argparse.Namespace) -> int:
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="gpu-pipeline-out-")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work or tempfile.mkdtemp(prefix="gpu-pipeline-work-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(out_dir, work_dir, args.dry_run, args.budget_s)
    device = "cpu" if args.dry_run else gpu_name()
    peak = None
    if device not in ("cpu", None):
        from benchmarks.gpu_train import peak_tflops

        peak = peak_tflops(device)
    report: dict[str, Any] = {
        "benchmark": "gpu_pipeline",
        "mode": "dry-run" if args.dry_run else "gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "peak_bf16_tflops": peak,
        "versions": versions(),
        "out": str(out_dir),
        "work": str(work_dir),
        "checks": {name: {"status": "skipped", "reason": "not started"} for name in CHECKS},
    }
    if args.dry_run:
        report["replaced"] = DRY_RUN_REPLACEMENTS

    def save() -> None:
        report["seconds"] = round(time.monotonic() - runner.started, 1)
        report["status"] = "failed" if any(check["status"] == "failed" for check in report["checks"].values()) else "ok"
        temporary = out_dir / "gpu_pipeline.json.tmp"
        temporary.write_text(json.dumps(report, indent=1))
        temporary.replace(out_dir / "gpu_pipeline.json")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if device is None:
            for name in CHECKS:
                report["checks"][name] = {"status": "skipped", "reason": "needs a GPU: no CUDA GPU is visible (use --dry-run)"}
        else:
            run_checks(runner, report, save)
    except KeyboardInterrupt as interruption:  # the shell script's time limit: report what was done
        for name, check in report["checks"].items():
            if name == runner.current:
                report["checks"][name] = {"status": "failed", "error": f"stopped ({interruption}) before it finished"}
            elif check.get("reason") == "not started":
                check["reason"] = f"not reached: stopped ({interruption})"
    finally:
        runner.stop_all()
        save()
        if not args.keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(report), flush=True)
    return 0


# --- helpers run as subprocesses ----------------------------------------------------------------


def main_loraflow(peaks_path: Path, invocations: list[list[str]]) -> int:
    """Runs `loraflow ARGS` for each invocation in this process, recording exit code, seconds, stage times
    and the peak GPU memory it allocated (`torch.cuda.max_memory_allocated`, reset in between)."""
    import gc
    import resource

    from flows.cli import app

    results = []
    for arguments in invocations:
        started = time.monotonic()
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            app(args=arguments, prog_name="loraflow")
            exit_code = 0
        except SystemExit as stop:
            exit_code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        results.append({
            "args": ["loraflow", *arguments],
            "exit_code": exit_code,
            "seconds": round(time.monotonic() - started, 2),
            "stage_seconds": stage_seconds(arguments),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        })
        peaks_path.write_text(json.dumps(results))
        if exit_code != 0:
            return exit_code
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


def stage_seconds(arguments: list[str]) -> dict[str, float]:
    """Stage durations of the run summary a `loraflow run CONFIG` just wrote (stages that ran only)."""
    if not arguments or arguments[0] != "run":
        return {}
    from tasks.config_load import load_config

    summary_path = Path(load_config(arguments[1]).output_dir) / "run_summary.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text())
    return {stage: outcome["duration_s"] for stage, outcome in summary["stages"].items() if outcome["state"] == "ran"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the tiny model, on a CPU")
    parser.add_argument("--out", default=None, help="where gpu_pipeline.json/.log go (default: a new temp dir)")
    parser.add_argument("--work", default=None, help="models, configs and stage outputs (default: a new temp dir, removed after)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work dir")
    parser.add_argument("--budget-s", type=float, default=None, help="start no check after this (default 480 on a GPU, 240 dry)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 480.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loraflow"]:
        peaks = Path(argv[argv.index("--peaks") + 1])
        invocations: list[list[str]] = []
        for argument in argv[argv.index("--peaks") + 2:]:
            if argument == "--":
                invocations.append([])
            else:
                invocations[-1].append(argument)
        return main_loraflow(peaks, invocations)
    if argv[:1] == ["build-model"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pipeline build-model")
        parser.add_argument("--shape", choices=("llama-1b", "llama3-8b"), required=True)
        parser.add_argument("--tokenizer", type=Path, required=True)
        parser.add_argument("--device", default="cuda")
        parser.add_argument("out_dir", type=Path)
        build = parser.parse_args(argv[1:])
        return main_build_model(build.shape, build.tokenizer, build.device, build.out_dir)
    return main_driver(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
