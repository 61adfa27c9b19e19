"""Training checkpoints: when one counts as complete, which one a run resumes from, how many are kept,
and the checkpoint a SIGTERM asks for before training stops.

The Trainer writes a checkpoint's files in place, each process its own (RNG states; optimizer
shards under DeepSpeed and FSDP), and would rotate before anyone can tell a whole checkpoint from
a torn one. Here a marker file, written by the main process once every process has written its
files, is a checkpoint's last file; only marked checkpoints are resumed from or count toward
`save_total_limit`, so a crash at any moment leaves the newest complete checkpoint in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tasks import atomic

log = logging.getLogger("loraflow.train")

# Written after every other file of a checkpoint is on disk: a checkpoint without it is torn.
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def checkpoints(checkpoint_root: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    found = [path for path in checkpoint_root.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return json.loads((checkpoint / COMPLETE_MARKER).read_text())["step"] == checkpoint_step(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_complete_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest checkpoint that carries its completion marker (written after all its files)."""
    return next((path for path in checkpoints(checkpoint_root) if is_complete(path)), None)


def prepare_resume(checkpoint_root: Path) -> Path | None:
    """The checkpoint a run resumes from, after discarding the torn ones newer than it (the resumed
    run writes them again). Done once, before any training process starts."""
    resume_from = latest_complete_checkpoint(checkpoint_root)
    resume_step = checkpoint_step(resume_from) if resume_from else 0
    for path in checkpoints(checkpoint_root):
        if checkpoint_step(path) > resume_step:
            log.info("train: discarding incomplete %s", path.name)
            shutil.rmtree(path)
    if resume_from is not None:
        log.info("train: resuming from step %d (%s)", resume_step, resume_from)
    return resume_from


def discard_all(checkpoint_root: Path) -> None:
    """A finished stage never resumes: its checkpoints are dead weight in the published output."""
    for checkpoint in checkpoints(checkpoint_root):
        shutil.rmtree(checkpoint)


class CheckpointKeeper(TrainerCallback):
    """Marks each checkpoint complete once every process has flushed its files, then rotates by
    `save_total_limit`, counting complete checkpoints only."""

    def __init__(self, save_total_limit: int | None) -> None:
        self.save_total_limit = save_total_limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from accelerate import PartialState

        # Each process writes its own RNG state (and optimizer shard) without a barrier after it.
        PartialState().wait_for_everyone()
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        atomic.fsync_tree(checkpoint)  # every file on disk before the marker that vouches for them
        atomic.write_json(checkpoint / COMPLETE_MARKER, {"step": state.global_step})
        if self.save_total_limit:
            complete = [path for path in checkpoints(checkpoint.parent) if is_complete(path)]
            for path in complete[self.save_total_limit:]:
                shutil.rmtree(path)


class StopOnSigterm(TrainerCallback):
    """A Trainer callback that turns SIGTERM into "save a checkpoint at the end of this logging
    interval, then stop", so a preempted run loses at most `logging_steps` steps and the next run
    resumes to the same bytes and loss curve.
    The handler is installed only around training, in the main thread (where signals arrive)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _request(self, signum: int, frame: Any) -> None:
        log.warning("train: SIGTERM received; saving a checkpoint at the end of this logging interval, then stopping")
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # At the end of a logging interval: a resume inside one would log its mean over fewer steps,
        # and the loss curve would no longer equal an uninterrupted run's.
        interval_done = state.global_step % max(1, int(args.logging_steps)) == 0
        if self.requested and self.stopped_at is None and interval_done:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
