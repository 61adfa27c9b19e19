"""Packing benchmark: slot efficiency, packing speed, and training throughput on CPU.

Run from the repository root: `.venv/bin/python -m benchmarks.packing` (about 15 s on 2 idle cores).
The last line printed is one JSON object with every figure, for CI to record.
"""

import json
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.packing import (
    IGNORE_INDEX,
    PackedCollator,
    pack_lengths,
    pack_samples,
    packing_efficiency,
)

SEED = 0
PAD_TOKEN_ID = 0
PADDED_BATCH_SIZE = 8
TIMING_REPEATS = 3


def lognormal_lengths(count: int, median: int, low: int, high: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.round(rng.lognormal(np.log(median), 0.9, count))
    return np.clip(lengths, low, high).astype(np.int64)


def greedy_efficiency(lengths: np.ndarray, sequence_len: int) -> float:
    """Naive packing: fill the row in data order; start a new one when a sample won't fit."""
    rows, used = 1, 0
    for length in lengths.tolist():
        if used + length > sequence_len:
            rows, used = rows + 1, 0
        used += length
    return int(lengths.sum()) / (rows * sequence_len)


def random_batches(count: int, batch_size: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def padded_efficiency(lengths: np.ndarray, batch_size: int) -> float:
    """No packing: random batches padded to their longest sample."""
    slots = sum(
        len(batch) * int(lengths[batch].max())
        for batch in random_batches(len(lengths), batch_size, SEED)
    )
    return int(lengths.sum()) / slots


def compare_efficiency(name: str, lengths: np.ndarray, sequence_len: int) -> dict[str, float]:
    started = time.perf_counter()
    bins = pack_lengths(lengths, sequence_len, seed=SEED)
    seconds = time.perf_counter() - started
    figures = {
        "ours": packing_efficiency(lengths, bins, sequence_len),
        "greedy": greedy_efficiency(lengths, sequence_len),
        "padded": padded_efficiency(lengths, PADDED_BATCH_SIZE),
        "lower_bound": float(
            lengths.sum() / (np.ceil(lengths.sum() / sequence_len) * sequence_len)
        ),
    }
    print(
        f"{name}: {len(lengths):,} samples, median {int(np.median(lengths))}, p99 "
        f"{int(np.percentile(lengths, 99))}, sequence_len {sequence_len}, packed in {seconds:.3f} s"
    )
    print(
        f"  efficiency  ours {figures['ours']:.5f}"
        f" | greedy in order {figures['greedy']:.5f}"
        f" | padded, batches of {PADDED_BATCH_SIZE} {figures['padded']:.5f}"
        f" | bound {figures['lower_bound']:.5f}"
    )
    return figures


def pad_to_longest(samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """The usual unpacked batch: right padding hidden by an attention mask."""
    longest = max(len(input_ids) for input_ids in samples)
    input_ids, labels, attention_mask = [], [], []
    for sample in samples:
        padding = longest - len(sample)
        input_ids.append(sample + [PAD_TOKEN_ID] * padding)
        labels.append(sample + [IGNORE_INDEX] * padding)
        attention_mask.append([1] * len(sample) + [0] * padding)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attention_mask),
    }


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32).train()


def training_seconds(batches: list[dict[str, torch.Tensor]]) -> float:
    """Wall time of full forward + backward + AdamW steps over `batches`, after one warm-up step."""
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> None:
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - started


def compare_training(packed_steps: int, rows_per_step: int) -> dict[str, float]:
    """The same samples, packed into 512-token rows vs in random batches padded to the longest."""
    sequence_len = 512
    lengths = lognormal_lengths(4000, median=60, low=4, high=sequence_len, seed=SEED + 1)
    token_rng = np.random.default_rng(SEED)
    samples = []
    for length in lengths.tolist():
        input_ids = token_rng.integers(1, 2048, length).tolist()
        samples.append({"input_ids": input_ids, "labels": input_ids})
    rows = pack_samples(samples, sequence_len, seed=SEED)[: packed_steps * rows_per_step]
    collate = PackedCollator(pad_token_id=PAD_TOKEN_ID)
    packed_batches = [
        collate(rows[start : start + rows_per_step]) for start in range(0, len(rows), rows_per_step)
    ]

    # Recover the samples from the rows (each row is whole samples back to back).
    used_samples = []
    for row in rows:
        start = 0
        for length in row["sample_lengths"]:
            used_samples.append(row["input_ids"][start : start + length])
            start += length
    padded_batches = [
        pad_to_longest([used_samples[index] for index in batch.tolist()])
        for batch in random_batches(len(used_samples), PADDED_BATCH_SIZE, SEED)
    ]
    # Best of alternating repeats: on 2 cores, any other busy process slows torch's threads a lot.
    packed_seconds, padded_seconds = [], []
    for _ in range(TIMING_REPEATS):
        packed_seconds.append(training_seconds(packed_batches))
        padded_seconds.append(training_seconds(padded_batches))
    useful_tokens = sum(row["num_tokens"] for row in rows)
    figures = {
        "samples": len(used_samples),
        "packed": useful_tokens / min(packed_seconds),
        "padded": useful_tokens / min(padded_seconds),
    }
    figures["speedup"] = figures["packed"] / figures["padded"]
    print(
        f"training on CPU, tiny Llama: {len(used_samples)} samples, {useful_tokens:,} tokens"
        f" | packed {len(packed_batches)} steps of {rows_per_step}x{sequence_len}:"
        f" {figures['packed']:,.0f} tok/s | padded "
        f"{len(padded_batches)} steps of {PADDED_BATCH_SIZE}: {figures['padded']:,.0f} tok/s | "
        f"speedup {figures['speedup']:.2f}x"
    )
    return figures


def main() -> None:
    torch.set_num_threads(2)
    long_chat = compare_efficiency(
        "long chat", lognormal_lengths(50_000, median=300, low=8, high=2048, seed=SEED), 2048
    )
    short_chat = compare_efficiency(
        "short chat", lognormal_lengths(50_000, median=40, low=4, high=256, seed=SEED), 256
    )
    # Like the quickstart data: every sample about a tenth of the row.
    narrow_band = compare_efficiency(
        "narrow band", np.random.default_rng(SEED).integers(38, 61, 3000), 512
    )

    million = lognormal_lengths(1_000_000, median=300, low=8, high=2048, seed=SEED)
    started = time.perf_counter()
    pack_lengths(million, 2048, seed=SEED)
    pack_1m_seconds = time.perf_counter() - started
    print(
        f"packing 1,000,000 lengths into 2048-token rows: {pack_1m_seconds:.2f} s (target < 10 s)"
    )

    training = compare_training(packed_steps=6, rows_per_step=4)
    print(
        json.dumps(
            {
                "efficiency_ours": round(long_chat["ours"], 5),
                "efficiency_greedy": round(long_chat["greedy"], 5),
                "efficiency_padded": round(long_chat["padded"], 5),
                "efficiency_lower_bound": round(long_chat["lower_bound"], 5),
                "short_efficiency_ours": round(short_chat["ours"], 5),
                "short_efficiency_greedy": round(short_chat["greedy"], 5),
                "short_efficiency_padded": round(short_chat["padded"], 5),
                "short_efficiency_lower_bound": round(short_chat["lower_bound"], 5),
                "narrow_efficiency_ours": round(narrow_band["ours"], 5),
                "narrow_efficiency_greedy": round(narrow_band["greedy"], 5),
                "narrow_efficiency_padded": round(narrow_band["padded"], 5),
                "narrow_efficiency_lower_bound": round(narrow_band["lower_bound"], 5),
                "pack_1m_seconds": round(pack_1m_seconds, 3),
                "train_samples": training["samples"],
                "tokens_per_s_packed": round(training["packed"], 1),
                "tokens_per_s_padded": round(training["padded"], 1),
                "packed_vs_padded_speedup": round(training["speedup"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
