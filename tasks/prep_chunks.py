"""prep's first pass in content-addressed chunks: rows -> messages -> tokens with masked labels,
cached per chunk and built on every core.

Nightly data grows by appending, so a source is cut into chunks of rows whose boundaries depend
on the rows themselves (a row ends a chunk when the CRC of its bytes says so, between
`CHUNK_MIN_ROWS` and `CHUNK_MAX_ROWS`): rows appended to a file change only its last chunk and add
new ones, and a row edited in the middle changes one chunk. A chunk's output is keyed on its bytes
and on everything that decides how a row is tokenized (the *recipe*: dataset settings, prep
settings, tokenizer, library versions, this code), and lives in `<state_dir>/prep-chunks/<key>/`
where any later prep, of any run config, reuses it.

A chunk's output holds one record per source row (accepted with its samples, or the reason it
was rejected) and the samples themselves, as Arrow files read memory-mapped. What depends on
other chunks is left to the assembly in `tasks.prep`: exact deduplication (first occurrence
wins, across chunks and sources), dropping test-set rows, the contract, the split and packing.

Workers are spawned processes (`dataset_processes`, default: every core) that receive the
tokenizer once as a `ChatEncoder` and read their chunk's bytes from the file themselves. A few
chunks are built in this process: starting workers costs more than they would save.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks import atomic
from tasks.chat_tokens import ChatEncoder, ContentError, TokenizedConversation, render_conversation, tokenize_rendered, tokenize_segments
from tasks.config import DatasetConfig, RunConfig
from tasks.fingerprint import code_version, hash_json
from tasks.formats import Conversation, Rejected, RowError, conversation_of, is_plain_jsonl, json_lines, read_rows
from tasks.fragments import FragmentError, fragment_settings, split_row

CHUNK_MIN_ROWS = 256
CHUNK_MAX_ROWS = 8192
CHUNK_BOUNDARY = 1024  # a row whose CRC is a multiple of this ends a chunk: about 1,300 rows per chunk
TOKENIZE_BATCH = 512
# Fewer rows than this to build: one process does it (a worker takes about a second to start).
ROWS_PER_WORKER_START = 4096
CHUNKS_DIR = "prep-chunks"
CODE = ("prep_chunks", "formats", "chat_tokens", "fragments")

ROW_SCHEMA = pa.schema([
    ("line", pa.int32()),  # relative to the chunk's first line
    ("reason", pa.string()),  # why the row is rejected; null when accepted
    ("raw", pa.string()),  # the quarantine record's text: the row as read, or its messages
    ("content_hash", pa.string()),  # of the normalized messages; null for unreadable rows
    ("messages", pa.string()),  # JSON
    ("columns", pa.string()),  # JSON: what a data contract can constrain (accepted rows)
    ("truncated", pa.bool_()),
    ("fragments", pa.int32()),  # pieces of a split document; 0 when not split
    ("first_sample", pa.int32()),
    ("samples", pa.int32()),
])
SAMPLE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("trained", pa.int32()),
])


@dataclass(frozen=True)
class SourceChunk:
    """A run of rows of one source, named by the digest of their bytes. Worker processes read a
    plain JSONL chunk's byte range themselves; other formats carry their rows."""

    first_line: int
    rows: int
    digest: str
    ends_source: bool  # the source's last chunk, ended by the end of the file rather than a boundary
    path: str | None = None
    byte_range: tuple[int, int] | None = None
    items: list[tuple[int, Any, str]] | None = None  # (line, row or the reason it is unreadable, raw text)


def source_chunks(dataset: DatasetConfig, max_rows: int | None = None) -> Iterator[SourceChunk]:
    """The chunks of a source, in order; at most `max_rows` rows (`dataset_max_rows`)."""
    if is_plain_jsonl(dataset):
        yield from _byte_range_chunks(Path(dataset.path), max_rows)
    else:
        yield from _row_chunks(dataset, max_rows)


def _ends_chunk(raw: bytes, rows: int) -> bool:
    return rows >= CHUNK_MAX_ROWS or (rows >= CHUNK_MIN_ROWS and zlib.crc32(raw) % CHUNK_BOUNDARY == 0)


def _byte_range_chunks(path: Path, max_rows: int | None) -> Iterator[SourceChunk]:
    # A chunk's lines are hashed in one call when it ends: hashing line by line costs more in calls than in bytes.
    lines: list[bytes] = []
    rows, total, start, first_line, offset = 0, 0, 0, 1, 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if max_rows is not None and total == max_rows:
                break
            offset += len(raw)
            lines.append(raw)
            if not raw.strip():
                continue
            rows += 1
            total += 1
            if _ends_chunk(raw, rows):
                yield SourceChunk(first_line, rows, hashlib.sha256(b"".join(lines)).hexdigest(), False, str(path), (start, offset))
                lines, rows, start, first_line = [], 0, offset, line_number + 1
    if rows:
        yield SourceChunk(first_line, rows, hashlib.sha256(b"".join(lines)).hexdigest(), True, str(path), (start, offset))


def _row_chunks(dataset: DatasetConfig, max_rows: int | None) -> Iterator[SourceChunk]:
    digest, items, total = hashlib.sha256(), [], 0
    for line, row, raw in read_rows(dataset):
        if max_rows is not None and total == max_rows:
            break
        total += 1
        encoded = raw.encode("utf-8", "replace")
        digest.update(encoded + b"\n")
        items.append((line, str(row) if isinstance(row, RowError) else row, raw))
        if _ends_chunk(encoded, len(items)):
            yield SourceChunk(items[0][0], len(items), digest.hexdigest(), False, items=items)
            digest, items = hashlib.sha256(), []
    if items:
        yield SourceChunk(items[0][0], len(items), digest.hexdigest(), True, items=items)


def _chunk_rows(dataset: DatasetConfig, chunk: SourceChunk) -> Iterator[tuple[int, dict[str, Any] | RowError, str]]:
    if chunk.items is not None:
        for line, row, raw in chunk.items:
            yield line, RowError(row) if isinstance(row, str) else row, raw
        return
    assert chunk.path is not None and chunk.byte_range is not None
    start, end = chunk.byte_range
    with open(chunk.path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    yield from json_lines(data.splitlines(keepends=True), chunk.first_line)


# ---------------------------------------------------------------- keys and the cache


def chunks_root(cfg: RunConfig) -> Path:
    return Path(cfg.state_dir) / CHUNKS_DIR


TOKENIZER_SETTINGS = {"special_tokens", "tokens", "chat_template", "chat_template_jinja", "chat_template_kwargs", "trust_remote_code"}


def tokenizer_key(cfg: RunConfig, tokenizer_identity: Any, libraries: dict[str, str | None]) -> str:
    """What decides the run's tokenizer: its files (or hub revision), the settings that change it,
    and the library versions."""
    return hash_json({"tokenizer": tokenizer_identity, "settings": cfg.model_dump(mode="json", include=TOKENIZER_SETTINGS),
                      "libraries": libraries})[:32]


def recipe(cfg: RunConfig, dataset: DatasetConfig, tokenizer: str) -> str:
    """Everything besides a chunk's bytes that decides its output."""
    return hash_json({
        "dataset": dataset.model_dump(mode="json", exclude={"path", "contract"}),
        "settings": cfg.model_dump(mode="json", include={
            "sequence_len", "excess_length_strategy", "train_on_inputs", "fragment_str", "max_fragment_len", "fragment_overlap",
            "combine_fragment",
        }),
        "tokenizer": tokenizer,
        "code": code_version(*CODE),
    })


def encoder_for(cfg: RunConfig, tokenizer_key: str) -> ChatEncoder:
    """The run's tokenizer as a `ChatEncoder`, kept beside the chunks as JSON: a prep that only has
    a few new rows to tokenize then never imports transformers' tokenizer classes (about 3 s)."""
    path = chunks_root(cfg) / f"encoder-{tokenizer_key}.json"
    if path.is_file():
        try:
            return ChatEncoder.from_json(path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - a damaged file only costs loading the tokenizer again
            pass
    from tasks import hub
    from tasks.tokenizer import load_tokenizer

    encoder = ChatEncoder.of(load_tokenizer(cfg, hub.base_model_dir(cfg)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, encoder.to_json())
    return encoder


def chunk_key(recipe_key: str, chunk: SourceChunk) -> str:
    return hash_json({"recipe": recipe_key, "rows": chunk.digest, "count": chunk.rows})


def is_built(cfg: RunConfig, key: str) -> bool:
    return (chunks_root(cfg) / key / "rows.arrow").is_file()


@dataclass
class ChunkOutput:
    """A built chunk, memory-mapped: its row records and its samples."""

    key: str
    rows: pa.Table
    samples: pa.Table

    @classmethod
    def open(cls, cfg: RunConfig, key: str) -> ChunkOutput:
        directory = chunks_root(cfg) / key
        return cls(key, _read_arrow(directory / "rows.arrow"), _read_arrow(directory / "samples.arrow"))


def _read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


# ---------------------------------------------------------------- building


class ChunkBuilder:
    """Builds the chunks that are not built yet, as they are found: in this process while there
    are few rows to build, in `dataset_processes` spawned workers once there are enough to pay
    for starting them (about a second each). At most a few chunks wait in flight, so memory
    stays flat on sources whose chunks carry their rows.

    Use as a context manager; leaving it waits for every chunk (and raises the first failure)."""

    def __init__(self, cfg: RunConfig, encoder: ChatEncoder) -> None:
        self.cfg, self.encoder = cfg, encoder
        self.processes = cfg.dataset_processes or len(os.sched_getaffinity(0))
        self.pending: list[tuple[DatasetConfig, SourceChunk, str]] = []
        self.pool: Any = None
        self.futures: set[Any] = set()
        self.built = 0

    def __enter__(self) -> ChunkBuilder:
        return self

    def add(self, dataset: DatasetConfig, chunk: SourceChunk, key: str) -> None:
        self.pending.append((dataset, chunk, key))
        self.built += 1
        if self.pool is None and self.processes > 1 and sum(job[1].rows for job in self.pending) >= ROWS_PER_WORKER_START:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Spawned, not forked: this process runs Prefect's threads, and a fork copies their locks.
            self.pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.cfg, self.encoder))
        if self.pool is not None:
            self.futures.update(self.pool.submit(_build_in_worker, *job) for job in self.pending)
            self.pending.clear()
            self._wait(most_in_flight=2 * self.processes)

    def _wait(self, most_in_flight: int) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        while len(self.futures) > most_in_flight:
            done, self.futures = wait(self.futures, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()

    def __exit__(self, error_type: Any, error: Any, traceback: Any) -> None:
        try:
            if error is None:
                for job in self.pending:
                    build_chunk(self.cfg, job[0], self.encoder, job[1], job[2])
                self._wait(most_in_flight=0)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}


def _start_worker(cfg: RunConfig, encoder: ChatEncoder) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER.update(cfg=cfg, encoder=encoder)


def _build_in_worker(dataset: DatasetConfig, chunk: SourceChunk, key: str) -> None:  # pragma: no cover - runs in a worker
    build_chunk(_WORKER["cfg"], dataset, _WORKER["encoder"], chunk, key)


def build_chunk(cfg: RunConfig, dataset: DatasetConfig, encoder: ChatEncoder, chunk: SourceChunk, key: str) -> None:
    """Every row of the chunk as a record (accepted with its samples, or rejected with the
    reason), written to a temporary directory and renamed into `<chunks>/<key>/`."""
    records: list[dict[str, Any]] = []
    samples: list[TokenizedConversation] = []
    conversations: list[tuple[Conversation, dict[str, Any]]] = []

    def tokenize_pending() -> None:
        tokenized = tokenize_batch(cfg, dataset, encoder, [item for item, _ in conversations])
        for (item, record), tokens in zip(conversations, tokenized):
            _outcome(cfg, dataset, encoder, item, tokens, record, samples)
        conversations.clear()

    for line, row, raw in _chunk_rows(dataset, chunk):
        item = conversation_of(dataset, line, row, raw)
        record = {"line": line - chunk.first_line, "reason": None, "raw": None, "content_hash": None, "messages": None,
                  "columns": None, "truncated": False, "fragments": 0, "first_sample": len(samples), "samples": 0}
        records.append(record)
        if isinstance(item, Rejected):
            record.update(reason=item.reason, raw=item.as_record()["raw"])
            continue
        record["messages"] = json.dumps(item.messages, ensure_ascii=False)
        record["content_hash"] = hash_json({"kind": item.kind, "messages": item.messages})
        conversations.append((item, record))
        if len(conversations) == TOKENIZE_BATCH:
            tokenize_pending()
    tokenize_pending()

    final_dir = chunks_root(cfg) / key
    work_dir = atomic.temporary_sibling(final_dir)
    work_dir.mkdir(parents=True)
    try:
        _write_table(work_dir / "rows.arrow", ROW_SCHEMA, [[record[name] for record in records] for name in ROW_SCHEMA.names])
        _write_table(work_dir / "samples.arrow", SAMPLE_SCHEMA, [
            _int32_lists([sample.input_ids for sample in samples]), _int32_lists([sample.labels for sample in samples]),
            [sample.trained_tokens for sample in samples],
        ])
        atomic.fsync_tree(work_dir)
        if not atomic.publish_dir(work_dir, final_dir):  # built meanwhile by another prep: same key, same content
            shutil.rmtree(work_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def _outcome(cfg: RunConfig, dataset: DatasetConfig, encoder: ChatEncoder, item: Conversation,
             tokens: TokenizedConversation | ContentError, record: dict[str, Any], samples: list[TokenizedConversation]) -> None:
    """Fills a tokenized row's record: its samples (one, or a split document's fragments), or why it is rejected."""
    def reject(reason: str) -> None:
        record.update(reason=reason, raw=json.dumps({"messages": item.messages}, ensure_ascii=False))

    if isinstance(tokens, ContentError):
        return reject(str(tokens))
    pieces = [tokens]
    if len(tokens.input_ids) > cfg.sequence_len:
        if cfg.excess_length_strategy == "quarantine":
            return reject(f"{len(tokens.input_ids)} tokens, longer than sequence_len={cfg.sequence_len}; "
                          "raise sequence_len, shorten the row, or set excess_length_strategy: split (or truncate)")
        if cfg.excess_length_strategy == "split":
            try:
                pieces = split_row(encoder, item.kind, item.messages, dataset.roles_to_train, tokens, fragment_settings(cfg))
            except FragmentError as error:
                return reject(f"{len(tokens.input_ids)} tokens, longer than sequence_len={cfg.sequence_len}, and cannot be split: {error}")
            record["fragments"] = len(pieces)
        else:
            pieces = [tokens.truncated(cfg.sequence_len)]
            record["truncated"] = True
    if sum(piece.trained_tokens for piece in pieces) == 0:
        return reject("no trained tokens after masking (or truncation)")
    record.update(first_sample=len(samples), samples=len(pieces), columns=json.dumps(contract_columns(item, tokens), ensure_ascii=False))
    samples.extend(pieces)
    return None


def _write_table(path: Path, schema: pa.Schema, columns: list[Any]) -> None:
    arrays = [column if isinstance(column, pa.Array) else pa.array(column, type=field.type) for column, field in zip(columns, schema)]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(pa.table(arrays, schema=schema))


def _int32_lists(lists: list[list[int]]) -> pa.ListArray:
    """A list<int32> column from Python lists, through one flat array (several times faster than
    converting the nested lists)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(values) for values in lists], out=offsets[1:])
    flat = pa.array(list(itertools.chain.from_iterable(lists)), type=pa.int32())
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def tokenize_batch(
    cfg: RunConfig, dataset: DatasetConfig, tokenizer: Any, items: list[Conversation]
) -> list[TokenizedConversation | ContentError]:
    """Tokenized rows in order; a row whose content cannot be tokenized faithfully gets its error."""
    encoder = ChatEncoder.of(tokenizer)
    results: list[TokenizedConversation | ContentError | None] = [None] * len(items)
    rendered, rendered_at = [], []
    for position, item in enumerate(items):
        try:
            if item.kind == "text":
                results[position] = tokenize_segments(encoder, item.messages, cfg.train_on_inputs)
            else:
                rendered.append(render_conversation(encoder, item.messages, dataset.roles_to_train))
                rendered_at.append(position)
        except ContentError as error:
            results[position] = error
    if rendered:
        for position, tokens in zip(rendered_at, tokenize_rendered(encoder, rendered, dataset.train_on_eos, cfg.train_on_inputs)):
            results[position] = tokens
    return results  # type: ignore[return-value]


def contract_columns(item: Conversation, tokens: TokenizedConversation | None) -> dict[str, Any]:
    """The columns a contract can constrain: the row's scalar fields, plus columns derived per row
    so that rules like "ends with an assistant turn" or "num_tokens <= 256" are one line of YAML."""
    if item.kind == "chat":
        roles = [m["role"] for m in item.messages]
        answer = next((m["content"] for m in reversed(item.messages) if m["role"] == "assistant"), "")
        characters = sum(len(m["content"]) for m in item.messages)
    else:
        roles = ["text"] * len(item.messages)
        answer = next((s["text"] for s in reversed(item.messages) if s["train"]), "")
        characters = sum(len(s["text"]) for s in item.messages)
    return {
        **item.raw_columns,
        "num_messages": len(item.messages),
        "role_sequence": ",".join(roles),
        "last_role": roles[-1],
        "num_chars": characters,
        "assistant_text": answer,
        **({"num_tokens": len(tokens.input_ids), "trained_tokens": tokens.trained_tokens} if tokens else {}),
    }
