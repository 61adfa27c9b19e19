"""Reading sources and turning their rows into one message form.

Sources are read as streams of rows (JSONL, gzip/zstd JSONL, JSON arrays, Parquet, CSV, `datasets`
directories), so memory does not grow with the file. Every row either becomes a `Conversation` or
is `Rejected` with a reason that names the file, the row and the field; nothing is dropped silently.

A Conversation is either chat messages (rendered later with the model's chat template) or plain
text segments, each marked trained or not (`completion` and `input_output` rows).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import hub
from tasks.config import DatasetConfig
from tasks.errors import DataFamilyError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_BOM = b"\xef\xbb\xbf"


class DatasetError(DataFamilyError):
    """A whole source is unusable (missing, empty, wrong shape); the message says how to fix it."""


class RowError(DataFamilyError):
    """One row cannot be used; becomes a quarantine reason."""


@dataclass
class Rejected:
    source: str
    line: int
    reason: str
    raw: str

    def as_record(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "raw": self.raw[:2000]}


@dataclass
class Conversation:
    source: str
    line: int
    messages: list[dict[str, Any]]
    # "chat": role/content messages for the chat template; "text": {"text", "train"} segments.
    kind: str = "chat"
    raw_columns: dict[str, Any] = field(default_factory=dict)


def read_conversations(dataset: DatasetConfig) -> Iterator[Conversation | Rejected]:
    """One Conversation or Rejected per row of the source, in source order."""
    seen_any = False
    for line, row, raw in read_rows(dataset):
        seen_any = True
        yield conversation_of(dataset, line, row, raw)
    if not seen_any:
        raise DatasetError(f"{dataset.path}: the dataset is empty; add rows or remove it from `datasets`")


def conversation_of(dataset: DatasetConfig, line: int, row: dict[str, Any] | RowError, raw: str) -> Conversation | Rejected:
    """One row of a source as messages, or rejected with the reason."""
    if isinstance(row, RowError):
        return Rejected(dataset.path, line, str(row), raw)
    try:
        kind, messages = to_messages(dataset, row)
    except RowError as error:
        return Rejected(dataset.path, line, str(error), raw)
    scalars = {key: value for key, value in row.items() if isinstance(value, (str, int, float, bool)) or value is None}
    return Conversation(dataset.path, line, messages, kind, scalars)


def check_source(dataset: DatasetConfig, rows_to_look_at: int = 20) -> None:
    """Dataset-level problems, found in a second from the first rows: a missing, unreadable or
    empty source, or a configured field that none of the first rows has (then every row would be
    quarantined; a single row without it is a row-level problem)."""
    looked_at = 0
    first_row: dict[str, Any] | None = None
    for _, row, _ in read_rows(dataset):
        looked_at += 1
        if not isinstance(row, RowError):
            if all(name in row for name in required_fields(dataset)):
                return
            first_row = first_row or row
        if looked_at == rows_to_look_at:
            break
    if looked_at == 0:
        raise DatasetError(f"{dataset.path}: the dataset is empty; add rows or remove it from `datasets`")
    if first_row is not None:
        missing = next(name for name in required_fields(dataset) if name not in first_row)
        raise DatasetError(
            f"no column '{missing}' in {dataset.path}; columns: {', '.join(sorted(first_row)) or 'none'}; "
            f"{_layout_hint(dataset, first_row)}"
        )


def _layout_hint(dataset: DatasetConfig, row: dict[str, Any]) -> str:
    columns = set(row)
    if {"instruction", "output"} <= columns:
        return "the rows look like `type: alpaca`"
    if "conversations" in columns:
        return "the rows look like `type: sharegpt` (or set field_messages: conversations)"
    if "text" in columns:
        return "the rows look like `type: completion`"
    return _field_hint(dataset, required_fields(dataset)[0])


def _sharegpt_view(dataset: DatasetConfig) -> DatasetConfig:
    """ShareGPT rows: `conversations` (unless field_messages says otherwise) of from/value."""
    field_name = "conversations" if dataset.field_messages == "messages" else dataset.field_messages
    return dataset.model_copy(update={"field_messages": field_name, "message_property_mappings": {"role": "from", "content": "value"}})


def required_fields(dataset: DatasetConfig) -> list[str]:
    return {
        "chat_template": [dataset.field_messages],
        "chatml": [dataset.field_messages],
        "sharegpt": [_sharegpt_view(dataset).field_messages],
        "alpaca": [dataset.field_instruction, dataset.field_output],
        "completion": [dataset.field],
        "input_output": [dataset.field_segments],
    }[dataset.type]


# ---------------------------------------------------------------- rows -> messages


def to_messages(dataset: DatasetConfig, row: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    for name in required_fields(dataset):
        if name not in row:
            raise RowError(f"no field `{name}` (fields: {', '.join(sorted(row)) or 'none'}); {_field_hint(dataset, name)}")
    if dataset.type in ("chat_template", "chatml"):
        return "chat", _chat_messages(dataset, row[dataset.field_messages], strict_roles=True)
    if dataset.type == "sharegpt":
        mapped = _sharegpt_view(dataset)
        return "chat", _chat_messages(mapped, row[mapped.field_messages], strict_roles=False)
    if dataset.type == "alpaca":
        return "chat", _alpaca_messages(dataset, row)
    if dataset.type == "completion":
        text = row[dataset.field]
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"`{dataset.field}` is empty or not a string")
        return "text", [{"text": text, "train": True}]
    return "text", _segments(dataset, row[dataset.field_segments])


def _field_hint(dataset: DatasetConfig, name: str) -> str:
    if name == dataset.field_messages:
        return "set `field_messages`, or use `type: alpaca` / `completion` for other layouts"
    return f"set the matching `field_*` key for type `{dataset.type}`"


def _chat_messages(dataset: DatasetConfig, messages: Any, strict_roles: bool) -> list[dict[str, Any]]:
    field_name = dataset.field_messages
    if isinstance(messages, str):  # CSV cells carry JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError(f"`{field_name}` is a string that is not a JSON list of messages") from None
    if not isinstance(messages, list) or not messages:
        raise RowError(f"field `{field_name}` must be a non-empty list of messages")
    role_key = dataset.message_property_mappings.get("role", "role")
    content_key = dataset.message_property_mappings.get("content", "content")
    # Other mapped properties (e.g. `thinking` from Axolotl's field_thinking) reach the chat template as they are.
    extra_keys = {name: source for name, source in dataset.message_property_mappings.items() if name not in ("role", "content")}
    normalised = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"`{field_name}[{index}]` is not an object with `{role_key}` and `{content_key}`")
        role, content = message.get(role_key), message.get(content_key)
        role = role if strict_roles else SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise RowError(f"`{field_name}[{index}].{role_key}` is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"`{field_name}[{index}].{content_key}` is empty or not a string")
        normalised.append({"role": role, "content": content,
                           **{name: message[source] for name, source in extra_keys.items() if message.get(source) is not None}})
    if dataset.drop_system_message and normalised[0]["role"] == "system":
        normalised = normalised[1:]
    if not any(message["role"] in dataset.roles_to_train for message in normalised):
        raise RowError(f"no turn of a trained role ({', '.join(dataset.roles_to_train)}): nothing to train on")
    return normalised


def _alpaca_messages(dataset: DatasetConfig, row: dict[str, Any]) -> list[dict[str, Any]]:
    instruction, output = row[dataset.field_instruction], row[dataset.field_output]
    extra_input, system = row.get(dataset.field_input), row.get(dataset.field_system)
    for name, value in ((dataset.field_instruction, instruction), (dataset.field_output, output)):
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"`{name}` is empty or not a string")
    for name, value in ((dataset.field_input, extra_input), (dataset.field_system, system)):
        if value is not None and not isinstance(value, str):
            raise RowError(f"`{name}` must be a string, got {type(value).__name__}")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _segments(dataset: DatasetConfig, segments: Any) -> list[dict[str, Any]]:
    name = dataset.field_segments
    if not isinstance(segments, list) or not segments:
        raise RowError(f"`{name}` must be a non-empty list of {{text, train}} segments")
    normalised = []
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
            raise RowError(f"`{name}[{index}]` must be an object with a string `text`")
        if not isinstance(segment.get("train", False), bool):
            raise RowError(f"`{name}[{index}].train` must be true or false")
        normalised.append({"text": segment["text"], "train": segment.get("train", False)})
    if not any(segment["train"] and segment["text"] for segment in normalised):
        raise RowError(f"no segment of `{name}` has `train: true`: nothing to train on")
    return normalised


# ---------------------------------------------------------------- sources -> rows


def source_format(dataset: DatasetConfig) -> str:
    path = Path(dataset.path)
    if dataset.ds_type:
        return dataset.ds_type
    if path.is_dir():
        return "arrow"
    suffixes = [suffix.lower() for suffix in path.suffixes]
    for known, kind in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"), (".arrow", "arrow")):
        if known in suffixes:
            return kind
    raise DatasetError(f"{path}: cannot tell the file format from its name; set `ds_type` (json, parquet, csv or arrow)")


def read_rows(dataset: DatasetConfig) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    """(row number, row or RowError, raw text for quarantine) for each row of a source."""
    path = Path(dataset.path)
    if not path.exists() and hub.is_hub_id(dataset.path):
        rows = _hub_rows(dataset)
    elif not path.exists():
        raise DatasetError(f"{path}: dataset not found (datasets[].path in the config: a file, a directory or a hub dataset id)")
    else:
        kind = source_format(dataset)
        readers = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}
        rows = readers[kind](path) if kind in readers else _arrow_rows(path, dataset.split)
    try:
        yield from rows
    except DatasetError:
        raise
    except _unreadable_file_errors() as error:
        # Truncated or corrupt gzip/zstd streams, Parquet or Arrow files: the file itself is broken.
        raise DatasetError(f"{path}: cannot read the file ({type(error).__name__}: {error}); re-export or re-copy it") from None


def _unreadable_file_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt file raises; the zstd and Arrow errors can only come from
    those libraries once they are loaded, so they are looked up only then."""
    errors: list[type[BaseException]] = [EOFError, OSError, ValueError]
    for module_name, error_name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        if module_name in sys.modules:
            errors.append(getattr(sys.modules[module_name], error_name))
    return tuple(errors)


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    with _open_binary(path) as handle:
        first = handle.peek(64)[:64] if hasattr(handle, "peek") else b""
        if first.removeprefix(_BOM).lstrip().startswith(b"["):
            yield from _json_array_rows(path, handle.read())
            return
        yield from json_lines(handle, first_line=1)


def json_lines(lines: Iterable[bytes], first_line: int) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    """The rows of JSON lines, numbered from `first_line`; blank lines are skipped but counted."""
    for line_number, raw_line in enumerate(lines, start=first_line):
        if line_number == 1:
            raw_line = raw_line.removeprefix(_BOM)
        if raw_line.strip():
            yield line_number, *_parse_json_line(raw_line)


def is_plain_jsonl(dataset: DatasetConfig) -> bool:
    """A local, uncompressed JSON-lines file: prep's chunks of it are byte ranges that worker
    processes read themselves."""
    path = Path(dataset.path)
    if not path.is_file() or source_format(dataset) != "json" or path.suffix in (".gz", ".zst", ".zstd"):
        return False
    with path.open("rb") as handle:
        return not handle.read(64).removeprefix(_BOM).lstrip().startswith(b"[")


def _parse_json_line(raw_line: bytes) -> tuple[dict[str, Any] | RowError, str]:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return RowError(f"invalid UTF-8 at byte {error.start}; re-encode the file as UTF-8"), raw_line.decode("utf-8", "replace")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return RowError(f"not valid JSON ({error.msg} at column {error.colno})"), text.rstrip("\n")
    if not isinstance(row, dict):
        return RowError(f"expected a JSON object per line, got {type(row).__name__}"), text.rstrip("\n")
    return row, text.rstrip("\n")


def _json_array_rows(path: Path, content: bytes) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    try:
        rows = json.loads(content.removeprefix(_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a valid JSON array ({error}); fix the file or write it as JSONL") from None
    for index, row in enumerate(rows, start=1):
        raw = json.dumps(row, ensure_ascii=False)
        yield index, row if isinstance(row, dict) else RowError(f"expected a JSON object, got {type(row).__name__}"), raw


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    # Long chat transcripts exceed the csv module's default 128 KB cell limit.
    csv.field_size_limit(2**31 - 1)
    # surrogateescape keeps reading past invalid bytes, so one bad row does not sink the file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        for index, row in enumerate(reader, start=1):
            raw = json.dumps(row, ensure_ascii=False, default=str)
            if None in row or any(value is None for value in row.values()):
                yield index, RowError(f"row has a different number of columns than the header ({', '.join(reader.fieldnames or [])})"), raw
            elif any(_has_surrogates(value) for value in row.values()):
                yield index, RowError("invalid UTF-8 in this row; re-encode the file as UTF-8"), raw.encode("utf-8", "replace").decode()
            else:
                yield index, dict(row), raw


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            index += 1
            yield index, row, json.dumps(row, ensure_ascii=False, default=str)


def _hub_rows(dataset: DatasetConfig) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    """A hub dataset id: its snapshot resolved like a hub model (cache first, HF_HUB_OFFLINE honoured;
    the commit keys prep), read with `datasets.load_dataset` and `name`, `split`, `data_files`."""
    from datasets import load_dataset

    try:
        snapshot = hub.resolve(dataset.path, what="datasets[].path", repo_type="dataset").path
    except hub.ModelNotFoundError as error:
        raise DatasetError(str(error)) from None
    try:
        loaded = load_dataset(str(snapshot), name=dataset.name, split=dataset.split, data_files=dataset.data_files)
    except ValueError as error:  # an unknown split or configuration name
        raise DatasetError(f"{dataset.path}: {error}; check `split`, `name` and `data_files`") from None
    for index, row in enumerate(loaded, start=1):
        yield index, row, json.dumps(row, ensure_ascii=False, default=str)


def _arrow_rows(path: Path, split: str) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path)) if path.is_dir() else Dataset.from_file(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{path}: no split `{split}` (splits: {', '.join(loaded)}); set `split`")
        loaded = loaded[split]
    for index, row in enumerate(loaded, start=1):
        yield index, row, json.dumps(row, ensure_ascii=False, default=str)
