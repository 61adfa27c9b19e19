"""The Trainer as the train stage uses it: evaluation by token-weighted loss over the whole val split.

Kept apart from `tasks/train.py` because importing the Trainer costs seconds: only a stage that
trains (or scores the val split) imports this module.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer

from tasks.chat_tokens import IGNORE_INDEX
from tasks.errors import StageFailedError
from tasks.packing import PackedCollator


class EmptyValSplitError(StageFailedError):
    """The val split holds no trained token, so there is no loss to report."""


def token_weighted_loss(model: Any, rows: Any, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """Sum of token losses over `rows` divided by their number of trained tokens; returns (loss, tokens).

    Rows are batched with `PackedCollator`: no attention mask, position_ids from the rows and
    `use_cache=False`, so packed samples stay apart. Unlike the Trainer's mean of per-batch means,
    the result does not depend on how samples were packed or batched. Runs in eval mode without
    gradients and restores the model's mode afterwards.
    """
    import torch
    import torch.nn.functional as F

    collate = PackedCollator(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate([rows[index] for index in range(start, min(start + batch_size, len(rows)))])
                logits = model(
                    input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False
                ).logits
                targets = batch["labels"][:, 1:].to(device)
                losses = F.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                loss_sum += float(losses.double())
                tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise EmptyValSplitError("the val split has no trained tokens to score; check the prep manifest's val rows")
    return loss_sum / tokens, tokens


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 50 else None


class PackedRowsTrainer(Trainer):
    """The Trainer, with evaluation replaced by the token-weighted loss over the whole val split."""

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, Any]:
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        loss, tokens = token_weighted_loss(
            self.model, rows, self.data_collator.pad_token_id, self.args.per_device_eval_batch_size
        )
        metrics = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": perplexity(loss),
            f"{metric_key_prefix}_tokens": tokens,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
