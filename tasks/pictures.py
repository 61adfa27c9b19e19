"""Pictures where people look: the loss curve and the base-vs-tuned comparison in the Prefect UI.

The loss curve PNG is written by train (`tasks/progress.save_loss_curve`: train and eval loss and
the learning rate); the comparison chart is drawn here from eval's metrics and kept in the run's
output directory (`eval_comparison.png`). Both reach the flow run's Artifacts tab as one markdown
artifact with the images embedded as base64 data URIs: Prefect's UI renders them inline, with no
file server to keep running, and a nightly run's artifact stays readable after its state dir is
wiped. Made on every run, cached ones too, so each flow run shows its model's pictures.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from tasks import atomic, store
from tasks.config import RunConfig

COMPARISON = "eval_comparison.png"
# Metrics on a 0..1 scale, drawn side by side for base and tuned.
COMPARED_METRICS = ("accuracy", "exact_match", "rouge_l", "format_ok")


def comparison_chart(metrics: dict[str, dict[str, Any]]) -> bytes | None:
    """A bar chart of the 0..1 metrics each model (base, tuned, ...) has, as PNG bytes; None when
    eval scored none of them."""
    from matplotlib.figure import Figure

    roles = [role for role, values in metrics.items() if isinstance(values, dict)]
    names = [name for name in COMPARED_METRICS if any(isinstance(metrics[role].get(name), (int, float)) for role in roles)]
    if not names:
        return None
    figure = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    axes = figure.add_subplot()
    width = 0.8 / len(roles)
    for index, role in enumerate(roles):
        values = [float(metrics[role].get(name) or 0.0) for name in names]
        positions = [position + index * width for position in range(len(names))]
        bars = axes.bar(positions, values, width, label=role)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks([position + width * (len(roles) - 1) / 2 for position in range(len(names))], names)
    axes.set_ylim(0, 1.1)
    axes.set_title("eval: " + " vs ".join(roles))
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def run_pictures(cfg: RunConfig, train_manifest: dict | None, eval_manifest: dict | None) -> dict[str, Path]:
    """The run's pictures on disk: the train stage's loss curve, and the comparison chart written
    now into the run's output directory. Missing ones (a run without train or eval) are left out."""
    pictures: dict[str, Path] = {}
    if train_manifest and train_manifest.get("loss_curve"):
        loss_curve = store.output_dir(cfg, train_manifest) / train_manifest["loss_curve"]
        if loss_curve.is_file():
            pictures["loss_curve"] = loss_curve
    if eval_manifest and eval_manifest.get("metrics") and (chart := comparison_chart(eval_manifest["metrics"])):
        path = Path(cfg.output_dir) / COMPARISON
        atomic.write_bytes(path, chart)
        pictures["comparison"] = path
    return pictures


def pictures_markdown(cfg: RunConfig, pictures: dict[str, Path]) -> str:
    titles = {"loss_curve": "Loss curve (train loss, eval loss, learning rate)", "comparison": "Eval: base vs tuned"}
    parts = [f"# {cfg.name}: pictures"]
    for name, path in pictures.items():
        parts += [f"## {titles[name]}", f"![{name}]({data_uri(path.read_bytes())})", f"File: `{path}`"]
    return "\n\n".join(parts) + "\n"


def publish(cfg: RunConfig, pictures: dict[str, Path]) -> None:
    """The markdown artifact `<name>-pictures` with the images inline."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.stage import artifact_key

    if pictures:
        create_markdown_artifact(markdown=pictures_markdown(cfg, pictures), key=artifact_key(cfg.name, "pictures"),
                                 description="Loss curve and base-vs-tuned chart")
