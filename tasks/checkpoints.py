"""Training checkpoints: when one counts as complete, which one a run resumes from, how many are kept.

The Trainer writes a checkpoint's files in place, each process its own (RNG states; optimizer
shards under DeepSpeed and FSDP), and would rotate before anyone can tell a whole checkpoint from
a torn one. Here a marker file, written by the main process once every process has written its
files, is a checkpoint's last file; only marked checkpoints are resumed from or count toward
`save_total_limit`, so a crash at any moment leaves the newest complete checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tasks import store

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
        for path in checkpoint.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        store.write_json_atomic(checkpoint / COMPLETE_MARKER, {"step": state.global_step})
        directory = os.open(checkpoint, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        if self.save_total_limit:
            complete = [path for path in checkpoints(checkpoint.parent) if is_complete(path)]
            for path in complete[self.save_total_limit:]:
                shutil.rmtree(path)
