"""Reading sources and turning their rows into one message form.

Every row either becomes a list of `{"role", "content"}` messages or is quarantined with a reason
that names the file, the line and the field; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import DatasetConfig

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A whole source is unusable (missing, empty, wrong shape); the message says how to fix it."""


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
    messages: list[dict[str, str]]


def read_conversations(dataset: DatasetConfig) -> Iterator[Conversation | Rejected]:
    """Yields one Conversation or Rejected per non-blank line of a JSONL source, in file order."""
    path = Path(dataset.path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found (datasets[].path in the config)")
    seen_any = False
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            seen_any = True
            yield _parse_line(dataset, str(path), line_number, raw_line)
    if not seen_any:
        raise DatasetError(f"{path}: the dataset is empty; add rows or remove it from `datasets`")


def _parse_line(dataset: DatasetConfig, source: str, line: int, raw_line: bytes) -> Conversation | Rejected:
    def reject(reason: str) -> Rejected:
        return Rejected(source, line, reason, raw_line.decode("utf-8", errors="replace").rstrip("\n"))

    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return reject(f"invalid UTF-8 at byte {error.start}; re-encode the file as UTF-8")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return reject(f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(row, dict):
        return reject(f"expected a JSON object per line, got {type(row).__name__}")
    field = dataset.field_messages
    if field not in row:
        columns = ", ".join(sorted(row)) or "none"
        return reject(f"no field `{field}` (fields: {columns}); set `field_messages` in the config")
    messages = row[field]
    if not isinstance(messages, list) or not messages:
        return reject(f"field `{field}` must be a non-empty list of messages")
    normalised = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return reject(f"`{field}[{index}]` is not an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return reject(f"`{field}[{index}].role` is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            return reject(f"`{field}[{index}].content` is empty or not a string")
        normalised.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in normalised):
        return reject("no assistant turn: nothing to train on")
    return Conversation(source, line, normalised)
