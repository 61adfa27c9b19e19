"""Training progress where people look.

- `MetricsRecorder`: `metrics.jsonl` (step, loss, learning rate, grad norm, tokens/s; eval loss and
  perplexity), appended as training goes and rewritten from the checkpoint's history on resume, so
  a resumed run's file equals an uninterrupted run's.
- `TerminalProgressBar`: a tqdm bar with ETA on stderr, only when stderr is a terminal.
- `PrefectProgressCallback`: log lines at `logging_steps`, and in the Prefect UI a progress artifact
  that advances with the steps and a table of the loss curve.
- `save_loss_curve`: the loss-curve PNG kept with the stage's output.
- `ProgressFile` / `ProgressReplay`: when training runs in launched processes, the main one writes
  `progress.json` and the train task replays it and `metrics.jsonl` to the callbacks above.

Kept apart from `train.py` so the training logic itself runs (and is tested) without Prefect.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from tasks import atomic
from tasks.stage import artifact_key

log = logging.getLogger("loraflow.train")

METRICS = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "num_input_tokens_seen", "epoch")
EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_tokens")
_PROGRESS_UPDATES = 50


def metric_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training and evaluation entries of the Trainer's log history, as rows of metrics.jsonl."""
    records = []
    for entry in log_history:
        keys = TRAIN_KEYS if "loss" in entry else EVAL_KEYS if "eval_loss" in entry else ()
        if keys:
            records.append({"step": entry["step"], **{key: entry[key] for key in keys if key in entry}})
    return records


class MetricsRecorder(TrainerCallback):
    """Keeps `metrics.jsonl` in step with the Trainer's log history and adds tokens/s to it.

    Tokens/s is measured per logging interval, leaving out time spent evaluating and saving. It is
    written into the log history itself, so checkpoints carry it and a resumed run keeps the
    figures of the steps it did not redo. The last step is always logged, so the loss curve (and
    the train loss averaged from it) covers every step; so is every checkpoint's step, because the
    Trainer does not checkpoint a half-finished logging interval: a run resumed from a checkpoint
    inside one would log a mean over fewer steps than the uninterrupted run.

    Runs in every training process, because logging gathers the loss from all of them: a last-step
    log asked for by one process alone would leave it waiting for the others forever. Only the
    main process writes the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._since = (0.0, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # On resume the history is the checkpoint's: lines logged after it by the killed run go.
        if state.is_world_process_zero:
            atomic.write_jsonl(self.path, metric_records(state.log_history))
        self._since = (time.monotonic(), state.num_input_tokens_seen)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps or control.should_save:
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        entry = state.log_history[-1]
        if "loss" in entry:
            started, tokens = self._since
            now = time.monotonic()
            entry["tokens_per_second"] = round((state.num_input_tokens_seen - tokens) / max(now - started, 1e-9), 1)
            self._since = (now, state.num_input_tokens_seen)
        if not state.is_world_process_zero:
            return
        for record in metric_records([entry]):
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since = (time.monotonic(), self._since[1])

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since = (time.monotonic(), self._since[1])


class TerminalProgressBar(TrainerCallback):
    """Steps done, rate, ETA and the last loss, drawn on a terminal (tqdm)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, file=self.stream, desc="train", unit="step"
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def terminal_progress_bar(stream: TextIO | None = None) -> TerminalProgressBar | None:
    """A progress bar on `stream` (stderr) when it is a terminal; None under logs, pipes and CI."""
    stream = stream if stream is not None else sys.stderr
    return TerminalProgressBar(stream) if stream.isatty() else None


class PrefectProgressCallback(TrainerCallback):
    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.artifact_id: Any = None

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
        entry = state.log_history[-1]
        if "loss" in entry:
            log.info(
                "step %d/%d loss %.4f lr %.3g grad norm %.3g, %.0f tokens/s", state.global_step, state.max_steps,
                entry["loss"], entry.get("learning_rate", 0.0), entry.get("grad_norm", float("nan")),
                entry.get("tokens_per_second", float("nan")),
            )
        if "eval_loss" in entry:
            log.info(
                "step %d/%d eval loss %.4f perplexity %.3f", state.global_step, state.max_steps, entry["eval_loss"],
                entry.get("eval_perplexity", float("nan")),
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from prefect.artifacts import create_table_artifact

        rows = [record for record in metric_records(state.log_history) if "loss" in record]
        if rows:
            create_table_artifact(
                table=rows,
                key=artifact_key(self.run_name, "loss-curve"),
                description="Training loss by step (from the first step, also after a resume)",
            )


def save_loss_curve(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and eval loss and the learning rate by step as a PNG, written to a temporary name and renamed into place."""
    # The object API, not pyplot: no global backend or figure state in a library.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    axes = figure.add_subplot()
    train = [(record["step"], record["loss"]) for record in records if "loss" in record]
    evaluations = [(record["step"], record["eval_loss"]) for record in records if "eval_loss" in record]
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evaluations:
        axes.plot(*zip(*evaluations), marker="o", label="eval loss (val split, token-weighted)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    rates = [(record["step"], record["learning_rate"]) for record in records if "learning_rate" in record]
    if rates:  # the schedule on its own scale, so warmup and decay read beside the loss they shaped
        rate_axes = axes.twinx()
        rate_axes.plot(*zip(*rates), color="tab:gray", linestyle="--", label="learning rate")
        rate_axes.set_ylabel("learning rate")
        rate_handles, rate_labels = rate_axes.get_legend_handles_labels()
        handles, labels = handles + rate_handles, labels + rate_labels
    axes.legend(handles, labels)
    with atomic.atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")


class ProgressFile(TrainerCallback):
    """`progress.json` (step, max_steps), rewritten at every step by the main launched process;
    `metrics.jsonl` carries the rest. Listed after MetricsRecorder, so that once this file exists
    metrics.jsonl holds this run's history."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state)

    def _write(self, state: Any) -> None:
        atomic.write_json(self.path, {"global_step": state.global_step, "max_steps": state.max_steps})


class ProgressReplay:
    """Replays the progress files of launched training processes as Trainer callback events
    (train begin, step end, log, train end) to callbacks in this process. They see a TrainerState
    with `global_step`, `max_steps` and `log_history`; `args` is None."""

    def __init__(self, work_dir: Path, callbacks: list[Any]) -> None:
        from transformers import TrainerControl

        self.work_dir = work_dir
        self.callbacks = callbacks
        self.control = TrainerControl()
        self.state: Any = None
        self.start_step = 0
        self.delivered = 0

    def poll(self) -> None:
        from transformers import TrainerState

        try:
            progress = json.loads((self.work_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return
        if self.state is None:
            self.state = TrainerState(global_step=progress["global_step"], max_steps=progress["max_steps"])
            self.start_step = progress["global_step"]
            self._emit("on_train_begin")
        new = [record for record in self._records() if record["step"] > self.start_step][self.delivered:]
        for record in new:
            if record["step"] > progress["global_step"]:
                break
            self._advance(record["step"])
            self.state.log_history.append(record)
            self.delivered += 1
            self._emit("on_log", logs=record)
        self._advance(progress["global_step"])

    def finish(self) -> None:
        """After the processes exited cleanly: the last events, and train end with the whole history."""
        self.poll()
        if self.state is not None:
            self.state.log_history = self._records()
            self._emit("on_train_end")

    def _records(self) -> list[dict[str, Any]]:
        try:
            lines = (self.work_dir / METRICS).read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.endswith("}")]  # the last line may be half written

    def _advance(self, step: int) -> None:
        if step > self.state.global_step:
            self.state.global_step = step
            self._emit("on_step_end")

    def _emit(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(None, self.state, self.control, **kwargs)
