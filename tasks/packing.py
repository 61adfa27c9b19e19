"""Pack tokenized samples into rows of `sequence_len` tokens for training on packed sequences.

Packing removes padding: on chat-like data, padding each batch to its longest sample wastes most
of the compute. Samples in a packed row stay independent because each one restarts its
`position_ids` at 0, from which transformers builds a block-diagonal causal mask. That only
happens when the forward pass gets no `attention_mask` and no KV cache (`use_cache=False`; the
Trainer sets it), which is why `PackedCollator` returns no attention mask.

The packing itself is fixed for a seed; the Trainer's seeded sampler reshuffles the order of the
rows every epoch, deterministically, and replays it exactly when training resumes.
"""

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.chat_tokens import IGNORE_INDEX
from tasks.errors import DataFamilyError

if TYPE_CHECKING:
    import torch



class PackingError(DataFamilyError):
    """A sample or setting that packing cannot honour; the message names the sample and the fix."""


def pack_lengths(lengths: Sequence[int], sequence_len: int, *, seed: int) -> list[list[int]]:
    """Group sample indices into bins whose lengths sum to at most `sequence_len`.

    Best-fit decreasing first (longest samples first, each into the fullest bin that still has
    room), then the bins it left with a gap are repacked from a pool (`_repack_partial_bins`).
    Over a whole dataset this ends within a row or two of `ceil(total / sequence_len)` rows: on
    lognormal chat lengths, and on lengths in a narrow band of about a tenth of `sequence_len`
    (short prompt/answer pairs), where best-fit decreasing alone leaves 3% of the slots empty.

    `seed` breaks ties between equal lengths, mixes the repacking pool and shuffles the bins, so
    rows built from one length class are spread over the epoch instead of arriving together. The
    same lengths and seed always give the same bins; every index appears in exactly one bin.

    Raises `PackingError` (a `ValueError`) for a length that is not positive or exceeds
    `sequence_len`: truncating or quarantining such samples is the caller's decision.
    """
    if sequence_len <= 0:
        raise PackingError(f"sequence_len must be positive, got {sequence_len}")
    length_array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    _check_lengths(length_array, sequence_len)
    rng = np.random.default_rng(seed)
    full_bins, partial_bins = _best_fit_decreasing(length_array, sequence_len, rng)
    bins = full_bins + _repack_partial_bins(partial_bins, length_array.tolist(), sequence_len, rng)
    return [bins[bin_id] for bin_id in rng.permutation(len(bins)).tolist()]


def _best_fit_decreasing(
    lengths: np.ndarray, sequence_len: int, rng: np.random.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    """The bins best-fit decreasing makes, as (bins filled to `sequence_len`, bins with room)."""
    shuffled = rng.permutation(len(lengths))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    bins: list[list[int]] = []
    # Capacities are integers in [1, sequence_len], so each value keeps its own stack of bins and
    # a sorted list of the values that have any: "fullest bin that fits" is one bisect.
    bins_by_capacity: list[list[int]] = [[] for _ in range(sequence_len + 1)]
    open_capacities: list[int] = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        position = bisect_left(open_capacities, length)
        if position == len(open_capacities):
            bin_id = len(bins)
            bins.append([index])
            capacity = sequence_len
        else:
            capacity = open_capacities[position]
            same_capacity = bins_by_capacity[capacity]
            bin_id = same_capacity.pop()
            if not same_capacity:
                del open_capacities[position]
            bins[bin_id].append(index)
        remaining = capacity - length
        if remaining > 0:
            same_capacity = bins_by_capacity[remaining]
            if not same_capacity:
                insort(open_capacities, remaining)
            same_capacity.append(bin_id)
    with_room = {bin_id for capacity in open_capacities for bin_id in bins_by_capacity[capacity]}
    full_bins = [sample_indices for bin_id, sample_indices in enumerate(bins) if bin_id not in with_room]
    return full_bins, [bins[bin_id] for bin_id in sorted(with_room)]


def _repack_partial_bins(
    partial_bins: list[list[int]], lengths: list[int], sequence_len: int, rng: np.random.Generator
) -> list[list[int]]:
    """Repack the samples of bins that have room: whenever a pool of them holds two rows' worth
    of tokens, the pool's fullest subset that fits becomes a row.

    Best-fit decreasing strands a gap in nearly every bin when all samples are about a tenth of
    the row: it fills rows with nine 53-token samples and has nothing left that fits the last 35
    tokens. A random mix of a dozen or more lengths almost always has a subset that fills a row
    exactly, so the samples enter the pool in seeded random order. (A pool of 1.5 rows left one
    more row on the quickstart data; 3 rows gained nothing.) The result is kept only if it needs
    fewer bins, so this never does worse than best-fit decreasing.
    """
    samples = [index for sample_indices in partial_bins for index in sample_indices]
    repacked: list[list[int]] = []
    pool: list[int] = []
    pool_tokens = 0
    for index in rng.permutation(np.array(samples, dtype=np.int64)).tolist():
        pool.append(index)
        pool_tokens += lengths[index]
        if pool_tokens >= 2 * sequence_len:
            row, pool = _split_fullest_row(pool, lengths, sequence_len)
            repacked.append(row)
            pool_tokens = sum(lengths[index] for index in pool)
    while pool:
        row, pool = _split_fullest_row(pool, lengths, sequence_len)
        repacked.append(row)
    return repacked if len(repacked) < len(partial_bins) else partial_bins


def _split_fullest_row(
    pool: list[int], lengths: list[int], sequence_len: int
) -> tuple[list[int], list[int]]:
    """Split `pool` into its subset with the largest total up to `sequence_len`, and the rest.

    Subset sum with Python ints as bit sets: bit `t` of `reachable[k]` says some subset of the
    first `k` samples totals `t` tokens. Walking back from the best total, a sample is in the
    row exactly when that total is out of reach without it.
    """
    all_totals = (1 << (sequence_len + 1)) - 1
    reachable = [1]
    for index in pool:
        reachable.append((reachable[-1] | reachable[-1] << lengths[index]) & all_totals)
    total = reachable[-1].bit_length() - 1
    row: list[int] = []
    rest: list[int] = []
    for position in range(len(pool) - 1, -1, -1):
        index = pool[position]
        if reachable[position] >> total & 1:
            rest.append(index)
        else:
            row.append(index)
            total -= lengths[index]
    return row, rest


def _check_lengths(lengths: np.ndarray, sequence_len: int) -> None:
    too_long = np.flatnonzero(lengths > sequence_len)
    if too_long.size:
        index = int(too_long[0])
        raise PackingError(
            f"sample {index} has {int(lengths[index])} tokens, more than "
            f"sequence_len={sequence_len} ({too_long.size} such samples): truncate or "
            "quarantine them before packing, or raise sequence_len"
        )
    not_positive = np.flatnonzero(lengths <= 0)
    if not_positive.size:
        index = int(not_positive[0])
        raise PackingError(
            f"sample {index} has {int(lengths[index])} tokens ({not_positive.size} samples with "
            "no tokens): drop empty samples before packing"
        )


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], sequence_len: int) -> float:
    """Share of the `len(bins) * sequence_len` token slots that hold real tokens."""
    if not bins:
        return 0.0
    length_array = np.asarray(lengths, dtype=np.int64)
    real_tokens = sum(int(length_array[sample_indices].sum()) for sample_indices in bins)
    return real_tokens / (len(bins) * sequence_len)


def pack_samples(samples: Sequence[Mapping], sequence_len: int, *, seed: int) -> list[dict]:
    """Packs in-memory samples (`input_ids`, `labels`, -100 = not trained) into rows (see
    `packed_row`); prep does the same from its sample file with `pack_lengths` + `packed_row`."""
    lengths = []
    for index, sample in enumerate(samples):
        if len(sample["input_ids"]) != len(sample["labels"]):
            raise PackingError(
                f"sample {index} has {len(sample['input_ids'])} input_ids but "
                f"{len(sample['labels'])} labels: tokenization must emit one label per token"
            )
        lengths.append(len(sample["input_ids"]))
    return [packed_row([samples[index] for index in bin_]) for bin_ in pack_lengths(lengths, sequence_len, seed=seed)]


def packed_row(samples: Iterable[Mapping]) -> dict:
    """Concatenates samples into one row with `input_ids`, `labels`, `position_ids` (restarting
    at 0 per sample), `sample_lengths` and `num_tokens`. Rows are not padded; `PackedCollator`
    pads per batch. The first label of every sample is set to -100: the model shifts labels by
    one, so that label would be predicted from the previous sample's last token. A sample's
    first token has no context of its own, so nothing trainable is lost."""
    row: dict = {"input_ids": [], "labels": [], "position_ids": [], "sample_lengths": []}
    for sample in samples:
        length = len(sample["input_ids"])
        row["input_ids"].extend(sample["input_ids"])
        row["labels"].append(IGNORE_INDEX)
        row["labels"].extend(sample["labels"][1:])
        row["position_ids"].extend(range(length))
        row["sample_lengths"].append(length)
    row["num_tokens"] = len(row["input_ids"])
    return row


@dataclass(frozen=True)
class PackedCollator:
    """Batches packed rows for the transformers Trainer, padding to the longest row.

    Padding takes `pad_token_id`, label -100, and position_ids 0, 1, 2, ... so it forms a sample
    of its own that no real token attends to. No attention mask is returned: with one,
    transformers would skip the block-diagonal mask and let samples attend to each other.
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, "torch.Tensor"]:
        # Imported here so that packing datasets does not pay for importing torch.
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            padding = longest - len(row["input_ids"])
            batch["input_ids"].append([*row["input_ids"], *[self.pad_token_id] * padding])
            batch["labels"].append([*row["labels"], *[IGNORE_INDEX] * padding])
            batch["position_ids"].append([*row["position_ids"], *range(padding)])
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}
