"""Training progress where people look: log lines at `logging_steps`, and in the Prefect UI a
progress artifact that advances with the steps and a table of the loss curve.

Kept apart from `train.py` so the training logic itself runs (and is tested) without Prefect.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("loraflow.train")

_PROGRESS_UPDATES = 50


def artifact_key(run_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only; keys stay stable
    across nightly runs so the UI shows their history."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run_name}-{what}".lower()).strip("-")


class PrefectProgressCallback(TrainerCallback):
    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.artifact_id: Any = None
        self.loss_rows: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(
            progress=100.0 * state.global_step / max(state.max_steps, 1),
            key=artifact_key(self.run_name, "train-progress"),
            description=f"Training steps done, of {state.max_steps}",
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from prefect.artifacts import update_progress_artifact

        every = max(1, state.max_steps // _PROGRESS_UPDATES)
        if self.artifact_id is not None and (state.global_step % every == 0 or state.global_step == state.max_steps):
            update_progress_artifact(self.artifact_id, progress=100.0 * state.global_step / max(state.max_steps, 1))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            row = {"step": state.global_step, **{k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if k in logs}}
            self.loss_rows.append(row)
            log.info(
                "step %d/%d loss %.4f lr %.3g", state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", 0.0)
            )
        if "eval_loss" in logs:
            log.info("step %d/%d eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from prefect.artifacts import create_table_artifact

        if self.loss_rows:
            create_table_artifact(
                table=self.loss_rows,
                key=artifact_key(self.run_name, "loss-curve"),
                description="Training loss by step",
            )
