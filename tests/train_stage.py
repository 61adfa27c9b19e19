"""The train stage as the tests drive it: a shared config with prep run once, a state_dir per run,
and runs killed in a subprocess at a chosen moment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks import store
from tasks.config_load import load_config
from tasks.stage import run_stage, stage_key
from tasks.stages import PREP, TRAIN
from tasks.train import ADAPTER, CHECKPOINTS, METRICS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
SETTINGS = {
    "sequence_len": 256, "micro_batch_size": 2, "max_steps": 12, "save_steps": 4, "save_total_limit": 2,
    "eval_steps": 4, "logging_steps": 2, "lora_dropout": 0.1, "val_set_size": 0.1, "warmup_steps": 2,
}
# Runs the train stage as the pipeline would, slowed by a sleep after each step so the test can kill it
# mid-run, its log lines on stderr.
DRIVER = """
import json, logging, sys, time
from transformers import TrainerCallback
from tasks.config_load import load_config
from tasks.stage import run_stage
from tasks.stages import TRAIN

class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.25)

logging.basicConfig(level=logging.INFO, force=True)
prep_manifest = json.loads(open(sys.argv[3]).read())
run_stage(TRAIN, load_config(sys.argv[1]), {"prep": prep_manifest}, key=sys.argv[2], callbacks=[Pause()])
"""
# Bit-equality holds for a given number of threads; one thread each keeps three concurrent runs
# from fighting over two cores (OpenMP threads spin while they wait).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class Stage:
    """One state_dir holding the prep output of the shared config, and the train stage's paths in it."""

    def __init__(self, directory: Path, template: Template) -> None:
        raw = yaml.safe_load(template.config_path.read_text())
        raw["state_dir"] = str(directory / "state")
        self.config_path = directory / "run.yaml"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(raw))
        self.cfg = load_config(self.config_path)
        # Taken from the template, not recomputed: they hash code that may be edited while tests run.
        self.prep_manifest, self.fingerprint = template.prep_manifest, template.fingerprint
        self.prep_manifest_path = directory / "prep_manifest.json"
        self.prep_manifest_path.write_text(json.dumps(self.prep_manifest))
        self.final_dir = store.stage_dir(self.cfg, "train", self.fingerprint)
        self.checkpoints = store.partial_dir(self.final_dir) / CHECKPOINTS

    def run(self, callbacks: list | None = None) -> dict:
        return run_stage(TRAIN, self.cfg, {"prep": self.prep_manifest}, key=self.fingerprint, callbacks=callbacks)

    def run_and_kill(self, ready: Callable[[], bool], kill: Callable[[subprocess.Popen], None] | None = None) -> str:
        """Runs the stage in a subprocess and, as soon as `ready()` is true, SIGKILLs it (or calls
        `kill` with it and waits for it to end); returns what the stage process wrote to stderr."""
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(self.config_path), self.fingerprint, str(self.prep_manifest_path)],
                cwd=REPO, env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.DEVNULL, stderr=stderr,
            )
            deadline = time.monotonic() + 300
            while not ready():
                if process.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(f"the training process ended before it was killed:\n{stderr.read().decode()[-3000:]}")
                if time.monotonic() > deadline:
                    process.kill()
                    raise AssertionError("the training process never reached the point to kill it at")
                time.sleep(0.002)
            if kill is None:
                process.send_signal(signal.SIGKILL)
                assert process.wait() == -signal.SIGKILL
            else:
                kill(process)
                process.wait(timeout=120)
            stderr.seek(0)
            written = stderr.read().decode(errors="replace")
        assert store.read_manifest(self.final_dir) is None
        return written

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.final_dir / METRICS).read_text().splitlines()]


def loss_curve(records: list[dict]) -> list[dict]:
    """metrics.jsonl without the throughput figures, which measure wall time."""
    return [{key: value for key, value in record.items() if key != "tokens_per_second"} for record in records]


@dataclass(frozen=True)
class Template:
    config_path: Path
    prep_manifest: dict
    fingerprint: str


def build_template(directory: Path, tiny_model_dir: Path, **settings) -> Template:
    """The config (SETTINGS and `settings` over the quickstart's), with prep run once; each Stage
    copies the prep output into its own state_dir."""
    data = directory / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:120]))
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(SETTINGS, base_model=str(tiny_model_dir), state_dir=str(directory / "state"), output_dir=str(directory / "out"))
    raw.update(settings)
    raw["datasets"][0] = {"path": str(data), "type": "chat_template"}  # no contract: prep stays quick
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    prep_manifest = run_stage(PREP, cfg)
    return Template(path, prep_manifest, stage_key(TRAIN, cfg, {"prep": prep_manifest}))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a test module's runs: on a busy 2-core machine two threads spinning in
    OpenMP waits made the tiny model's training 7x slower, and bit-equality between runs holds for
    one number of threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_stage(template: Template, directory: Path) -> Stage:
    shutil.copytree(Path(load_config(template.config_path).state_dir) / "prep", directory / "state" / "prep")
    return Stage(directory, template)


def assert_same_result(resumed: Stage, reference: Stage) -> None:
    adapter = Path(ADAPTER) / "adapter_model.safetensors"
    assert (resumed.final_dir / adapter).read_bytes() == (reference.final_dir / adapter).read_bytes()
    assert loss_curve(resumed.metrics()) == loss_curve(reference.metrics())
