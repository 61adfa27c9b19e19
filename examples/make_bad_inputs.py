"""Write the bad inputs of `examples/bad/` that are too big or too binary to check in.

The checked-in cases are small text files; these are made at test time, the same bytes every time:
a 5 MB single-line message, a CSV cell past the csv module's default field limit, a Parquet file
without the configured column, a gzip file cut short, and a `datasets` directory without the
configured split. `examples/bad/EXPECTED.yaml` marks them `generated: true`.

    python examples/make_bad_inputs.py OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path

HUGE_MESSAGE_BYTES = 5_000_000
CSV_FIELD_CHARS = 200_000  # the csv module refuses fields over 131,072 characters by default
FILLER = "revenue guidance "


def chat_row(user: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def huge_single_line(path: Path) -> None:
    """Line 1 is normal; line 2 is one row whose user message is 5 MB of text."""
    huge = (FILLER * (HUGE_MESSAGE_BYTES // len(FILLER) + 1))[:HUGE_MESSAGE_BYTES]
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(chat_row("Nimbus Cloud posts record profit", "positive")) + "\n")
        handle.write(json.dumps(chat_row(huge, "positive")) + "\n")


def csv_huge_field(path: Path) -> None:
    """Record 2's messages cell is longer than the csv module's default field size limit."""
    huge = (FILLER * (CSV_FIELD_CHARS // len(FILLER) + 1))[:CSV_FIELD_CHARS]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "messages"])
        writer.writerow(["h1", json.dumps(chat_row("Nimbus Cloud posts record profit", "positive")["messages"])])
        writer.writerow(["h2", json.dumps(chat_row(huge, "positive")["messages"])])


def parquet_missing_messages(path: Path) -> None:
    """Alpaca-shaped columns where a chat dataset (a `messages` column) is configured."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "instruction": ["Classify the headline", "Classify the headline"],
        "input": ["Nimbus Cloud posts record profit", "Harbor Bank cuts its dividend"],
        "output": ["positive", "negative"],
    }), path)


def truncated_gzip(path: Path) -> None:
    """A gzip'd JSONL file cut in the middle of its compressed stream (an interrupted copy)."""
    lines = "".join(json.dumps(chat_row(f"Headline number {index} about quarterly profit", "positive")) + "\n" for index in range(400))
    compressed = gzip.compress(lines.encode(), mtime=0)
    path.write_bytes(compressed[: len(compressed) // 2])


def datasetdict_missing_split(path: Path) -> None:
    """A `DatasetDict` directory with `train` and `validation` splits (the case asks for `test`)."""
    from datasets import Dataset, DatasetDict

    rows = [chat_row("Nimbus Cloud posts record profit", "positive")]
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)}).save_to_disk(str(path))


GENERATORS: dict[str, Callable[[Path], None]] = {
    "huge_single_line.jsonl": huge_single_line,
    "csv_huge_field.csv": csv_huge_field,
    "parquet_missing_messages.parquet": parquet_missing_messages,
    "truncated_gzip.jsonl.gz": truncated_gzip,
    "datasetdict_missing_split": datasetdict_missing_split,
}


def write_generated(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, generate in GENERATORS.items():
        generate(out_dir / name)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    print(write_generated(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
