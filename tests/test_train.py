"""The train stage on the tiny model: exact resumption after kill -9, checkpoints, metrics, eval loss.

- a run killed (SIGKILL) in the middle resumes from its newest complete checkpoint, says so, and
  ends with the adapter bytes and loss curve of an uninterrupted run;
- a checkpoint torn by the kill (or made torn) is skipped: the run resumes from the one before;
- only `save_total_limit` complete checkpoints are kept while training;
- metrics.jsonl, the loss-curve PNG and the terminal progress bar show progress;
- the eval loss is token-weighted: packed and unpacked val rows of the same samples score the same;
- running out of memory names the settings to turn; a GPU-only optimizer on a CPU fails early.

The runs are tiny (about 110 rows, sequence_len 256, 12 steps across two epochs, a checkpoint and an
evaluation every 4 steps, lora_dropout > 0 so the RNG state matters).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pty
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tasks.checkpoints import COMPLETE_MARKER
from tasks.config import RunConfig
from tasks.stage import run_stage
from tasks.stages import TRAIN
from tasks.train import (
    CHECKPOINTS,
    LOSS_CURVE,
    TrainError,
    TrainingOutOfMemoryError,
    choose_attn_implementation,
    mean_step_loss,
    reporting_integrations,
)
from tasks.trainer import token_weighted_loss
from tests.train_stage import QUICKSTART_DATA, Stage, Template, assert_same_result, build_template, new_stage


@pytest.fixture(scope="module")
def template(tiny_model_dir, tmp_path_factory) -> Template:
    return build_template(tmp_path_factory.mktemp("train-template"), tiny_model_dir)


class CheckpointWatcher(TrainerCallback):
    """Records, at every save, which complete checkpoints exist once the keeper has rotated."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_save(self, args, state, control, **kwargs) -> None:
        root = Path(args.output_dir)
        complete = sorted(int(path.parent.name.split("-")[1]) for path in root.glob(f"checkpoint-*/{COMPLETE_MARKER}"))
        self.seen.append(complete)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Killed:
    stage: Stage
    thread: threading.Thread
    error: BaseException | None = None

    def wait(self) -> Stage:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.stage


def start_killed_run(template: Template, directory: Path, ready_at: str) -> Killed:
    """A run in a subprocess, killed in a background thread once `ready_at` (a path under checkpoints/) exists."""
    stage = new_stage(template, directory)
    killed = Killed(stage, threading.Thread())

    def run() -> None:
        try:
            stage.run_and_kill(lambda: (stage.checkpoints / ready_at).exists())
        except BaseException as error:  # handed to the test by Killed.wait
            killed.error = error

    killed.thread = threading.Thread(target=run)
    killed.thread.start()
    return killed


@pytest.fixture(scope="module")
def killed_runs(template, tmp_path_factory, one_thread) -> dict[str, Killed]:
    """Started before the reference run, so their start-up overlaps it."""
    return {
        "mid-run": start_killed_run(template, tmp_path_factory.mktemp("killed"), f"checkpoint-4/{COMPLETE_MARKER}"),
        # Once checkpoint-8's adapter is written: in practice before its optimizer, RNG and trainer state.
        "mid-checkpoint": start_killed_run(template, tmp_path_factory.mktemp("torn"), "checkpoint-8/adapter_model.safetensors"),
    }


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory, one_thread, killed_runs):
    """An uninterrupted run, watched by a checkpoint recorder and a progress bar on a pseudo-terminal."""
    from tasks.progress import TerminalProgressBar, terminal_progress_bar

    stage = new_stage(template, tmp_path_factory.mktemp("reference"))
    watcher = CheckpointWatcher()
    controller, terminal = pty.openpty()
    drawn: list[bytes] = []
    # Drained while training runs: a full pseudo-terminal buffer would block the bar's writes.
    reader = threading.Thread(target=drain, args=(controller, drawn))
    reader.start()
    with os.fdopen(terminal, "w") as terminal_stream:
        bar = terminal_progress_bar(terminal_stream)
        assert isinstance(bar, TerminalProgressBar)
        manifest = stage.run(callbacks=[watcher, bar])
    reader.join(timeout=10)
    os.close(controller)
    return stage, manifest, watcher.seen, b"".join(drawn).decode(errors="replace")


def drain(descriptor: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:  # EIO once the terminal side is closed
            return
        if not chunk:
            return
        chunks.append(chunk)


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(reference, killed_runs, caplog):
    reference_stage, reference_manifest, _, _ = reference
    stage = killed_runs["mid-run"].wait()

    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        manifest = stage.run()

    assert "train: resuming from step 4" in caplog.text
    assert manifest["resumed_from_step"] == 4 and reference_manifest["resumed_from_step"] is None
    assert_same_result(stage, reference_stage)
    for key in ("global_step", "train_loss", "eval_loss", "tokens_seen"):
        assert manifest[key] == reference_manifest[key], key


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes_to_the_same_adapter(reference, template, tmp_path, one_thread, caplog):
    from tasks.checkpoints import checkpoint_step, latest_complete_checkpoint

    reference_stage, _, _, _ = reference
    stage = new_stage(template, tmp_path)
    # SIGTERM (preemption, `kubectl delete`) soon after the checkpoint of step 4: saved at step 6, the end of its logging interval.
    written = stage.run_and_kill(
        lambda: (stage.checkpoints / f"checkpoint-4/{COMPLETE_MARKER}").exists(),
        kill=lambda process: (time.sleep(0.3), process.send_signal(signal.SIGTERM)),
    )
    assert "SIGTERM received" in written and "the next run resumes from it" in written
    saved = latest_complete_checkpoint(stage.checkpoints)
    assert saved is not None and checkpoint_step(saved) > 4

    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        manifest = stage.run()
    assert manifest["resumed_from_step"] == checkpoint_step(saved)
    assert_same_result(stage, reference_stage)


def test_torn_checkpoint_is_skipped_and_the_resume_still_matches(reference, killed_runs, caplog):
    reference_stage, reference_manifest, _, _ = reference
    stage = killed_runs["mid-checkpoint"].wait()
    torn = stage.checkpoints / "checkpoint-8"
    if (torn / COMPLETE_MARKER).exists():  # the kill came a moment late: tear it as a crash mid-write would
        (torn / COMPLETE_MARKER).unlink()
        state = torn / "trainer_state.json"
        state.write_bytes(state.read_bytes()[:100])
    assert (stage.checkpoints / "checkpoint-4" / COMPLETE_MARKER).is_file()

    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        manifest = stage.run()

    assert "discarding incomplete checkpoint-8" in caplog.text
    assert manifest["resumed_from_step"] == 4
    assert_same_result(stage, reference_stage)
    assert manifest["train_loss"] == reference_manifest["train_loss"]


def test_checkpoints_rotate_to_the_limit_and_are_dropped_when_published(reference):
    stage, _, checkpoints_seen, _ = reference

    assert checkpoints_seen == [[4], [4, 8], [8, 12]]
    assert not list((stage.final_dir / CHECKPOINTS).glob("checkpoint-*"))


def test_metrics_loss_curve_and_manifest_show_progress(reference):
    stage, manifest, _, _ = reference
    records = stage.metrics()
    train_records = [record for record in records if "loss" in record]
    eval_records = [record for record in records if "eval_loss" in record]

    assert [record["step"] for record in train_records] == [2, 4, 6, 8, 10, 12]
    for record in train_records:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "num_input_tokens_seen"} <= record.keys()
        assert record["tokens_per_second"] > 0
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert [record["step"] for record in eval_records] == [4, 8, 12]
    assert all(record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"])) for record in eval_records)
    assert manifest["eval_loss"] == eval_records[-1]["eval_loss"] and manifest["eval_tokens"] == eval_records[-1]["eval_tokens"]
    assert manifest["train_loss"] == mean_step_loss(train_records)
    assert manifest["global_step"] == 12 and manifest["attn_implementation"] == "sdpa"

    png = (stage.final_dir / LOSS_CURVE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (700, 400)


def test_progress_bar_draws_steps_and_eta_on_a_terminal_only(reference):
    from tasks.progress import terminal_progress_bar

    drawn = reference[3]
    assert "12/12" in drawn
    assert "step/s" in drawn or "s/step" in drawn
    assert "<" in drawn  # tqdm's "elapsed<remaining"
    assert "loss=" in drawn
    with open(os.devnull, "w") as not_a_terminal:
        assert terminal_progress_bar(not_a_terminal) is None


def test_eval_loss_is_token_weighted_so_packing_does_not_change_it(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.chat_tokens import tokenize_conversation
    from tasks.packing import PackedCollator, pack_samples

    samples = []
    for line in QUICKSTART_DATA.read_text().splitlines()[:40]:
        tokens = tokenize_conversation(tiny_tokenizer, json.loads(line)["messages"])
        samples.append({"input_ids": tokens.input_ids, "labels": tokens.labels})
    packed = pack_samples(samples, 256, seed=0)
    unpacked = [{**sample, "position_ids": list(range(len(sample["input_ids"])))} for sample in samples]
    assert len(packed) < len(unpacked)
    pad = tiny_tokenizer.pad_token_id

    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=implementation)
        packed_loss, packed_tokens = token_weighted_loss(model, packed, pad, batch_size=3)
        unpacked_loss, unpacked_tokens = token_weighted_loss(model, unpacked, pad, batch_size=4)
        assert packed_tokens == unpacked_tokens == sum(sum(label != -100 for label in s["labels"][1:]) for s in samples)
        assert abs(packed_loss - unpacked_loss) <= 1e-5, implementation

    # What the Trainer's evaluate would report, a mean of per-batch means, differs between the two.
    collate = PackedCollator(pad_token_id=pad)

    def mean_of_batch_means(rows: list[dict], batch_size: int) -> float:
        with torch.no_grad():
            means = [
                float(model(**collate(rows[start : start + batch_size]), use_cache=False).loss)
                for start in range(0, len(rows), batch_size)
            ]
        return sum(means) / len(means)

    assert abs(mean_of_batch_means(packed, 3) - mean_of_batch_means(unpacked, 4)) > 1e-3


def test_out_of_memory_is_reraised_with_the_settings_to_turn(template, tmp_path):
    import torch
    from transformers import TrainerCallback

    class AllocateTooMuch(TrainerCallback):
        """A real allocation failure in the middle of training, as an oversized batch would cause."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                torch.empty(2**46, dtype=torch.uint8)

    stage = new_stage(template, tmp_path)
    with pytest.raises(TrainingOutOfMemoryError) as raised:
        stage.run(callbacks=[AllocateTooMuch()])

    message = str(raised.value)
    assert "estimated peak" in message
    for knob in ("micro_batch_size: 1", "gradient_accumulation_steps: 2", "gradient_checkpointing: true", "adapter: qlora",
                 "sequence_len: 128"):
        assert knob in message
    assert "can't allocate memory" in str(raised.value.__cause__)


def test_gpu_only_optimizer_on_a_cpu_fails_before_loading_anything(template, tmp_path):
    stage = new_stage(template, tmp_path)
    cfg = stage.cfg.model_copy(update={"optimizer": "paged_adamw_8bit"})

    with pytest.raises(TrainError, match="paged_adamw_8bit` needs a CUDA GPU.*adamw_torch"):
        run_stage(TRAIN, cfg, {"prep": stage.prep_manifest})


def test_attention_and_reporting_follow_config_and_what_is_installed(tmp_path):
    import importlib.util

    base = {"base_model": str(tmp_path), "datasets": [{"path": "rows.jsonl"}]}
    assert choose_attn_implementation(RunConfig(**base)) == "sdpa"  # auto, on this CPU
    assert choose_attn_implementation(RunConfig(**base, attn_implementation="eager")) == "eager"
    assert choose_attn_implementation(RunConfig(**base, flash_attention=True)) == "flash_attention_2"

    requested = ["tensorboard", "wandb", "mlflow"]
    chosen = reporting_integrations(RunConfig(**base, report_to=requested))
    # MLflow and W&B are one run per pipeline run (tasks/tracking.py), never the Trainer's own.
    assert chosen == (["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else [])
    assert RunConfig(**base, report_to="none").report_to == []
    assert RunConfig(**base, report_to="wandb").report_to == ["wandb"]
