"""Long documents split into fragments instead of lost (`excess_length_strategy: split`).

A row longer than `sequence_len` is either a `completion` / `input_output` text or a chat whose
last assistant turn is too long. Its tokens are two parts: the *context*, everything before the
last trained stretch (the system prompt and earlier turns of a chat, the input of `input_output`,
nothing for `completion`), and the *body*, the last trained stretch and what follows it. The body
is cut into pieces, and every fragment is `context + [overlap] + piece`:

- a piece has at most `max_fragment_len` tokens (overlap included), and a fragment at most
  `sequence_len`;
- a piece ends at the last `fragment_str` boundary (e.g. `"\\n\\n"`, a paragraph) that lies in
  range; a stretch without one is cut at the limit;
- cuts are between tokens, never inside one, and never between two tokens of one character (a
  byte-level BPE spells an unseen CJK character as several byte tokens sharing one character
  offset);
- `fragment_overlap` tokens before a piece are repeated in front of it as context (a sliding
  window), their labels masked; the context is repeated too, its labels kept in the first
  fragment only. A fragment of a document without context starts at least one token early, as
  a causal LM never predicts a sample's first token. So every token of the document is trained
  exactly once, as it was in the row;
- with `combine_fragment`, consecutive fragments of one document are joined into one sample
  while it fits `sequence_len` (the context once, then the pieces in order, so the text between
  them is continuous and needs no overlap); without it each fragment is a sample of its own.

Plain functions over token ids, labels and each token's first character offset in the text, so
the rules are unit-tested without a model (`tests/test_fragments.py`); `token_offsets` recovers the
offsets of a tokenized row for prep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.chat_tokens import IGNORE_INDEX, ChatEncoder, TokenizedConversation, render_conversation
from tasks.config import RunConfig
from tasks.errors import DataFamilyError


class FragmentError(DataFamilyError):
    """A document that cannot be split: its context alone leaves no room for a piece."""


@dataclass(frozen=True)
class FragmentSettings:
    sequence_len: int
    max_fragment_len: int | None = None  # None: as long as sequence_len allows
    fragment_str: str | None = None  # None: cut at the length limit only
    overlap: int = 0
    combine: bool = False


def fragment_settings(cfg: RunConfig) -> FragmentSettings:
    return FragmentSettings(cfg.sequence_len, cfg.max_fragment_len, cfg.fragment_str, cfg.fragment_overlap, cfg.combine_fragment)


@dataclass(frozen=True)
class Span:
    """One fragment's body tokens: `[context_from, start)` are overlap (masked), `[start, end)` trained as in the row."""

    context_from: int
    start: int
    end: int


def context_length(labels: Sequence[int]) -> int:
    """Tokens before the last trained stretch (0 when every token is trained or none is)."""
    position = len(labels)
    while position > 0 and labels[position - 1] == IGNORE_INDEX:
        position -= 1
    while position > 0 and labels[position - 1] != IGNORE_INDEX:
        position -= 1
    return position


def character_safe(token_starts: Sequence[int], position: int) -> bool:
    """Whether a cut before token `position` falls between characters: the token starts a new one."""
    return position <= 0 or position >= len(token_starts) or token_starts[position] > token_starts[position - 1]


def boundary_cuts(text: str, token_starts: Sequence[int], fragment_str: str | None, first: int) -> set[int]:
    """Token positions right after an occurrence of `fragment_str` that begins at or after token
    `first`: the first token starting at or after the occurrence's end."""
    if not fragment_str or first >= len(token_starts):
        return set()
    cuts = set()
    token = first
    found = text.find(fragment_str, token_starts[first])
    while found >= 0:
        end = found + len(fragment_str)
        while token < len(token_starts) and token_starts[token] < end:
            token += 1
        if token < len(token_starts) and character_safe(token_starts, token):
            cuts.add(token)
        found = text.find(fragment_str, end)
    return cuts


def fragment_spans(labels: Sequence[int], token_starts: Sequence[int], text: str, settings: FragmentSettings) -> tuple[int, list[Span]]:
    """The context length and the body spans of a document (see the module docstring).

    Raises:
        FragmentError: the context plus the overlap leave no room for a piece in `sequence_len`.
    """
    total = len(labels)
    context = context_length(labels)
    limit = settings.max_fragment_len or settings.sequence_len
    preferred = boundary_cuts(text, token_starts, settings.fragment_str, context)
    spans: list[Span] = []
    start = context
    while start < total:
        context_from = start
        if spans:
            # A causal LM never predicts a sample's first token (packing masks its label too), so a
            # fragment without context starts one token early, masked: its first new token trains.
            context_from = max(context, start - max(settings.overlap, 0 if context else 1))
            while context_from < start - (0 if context else 1) and not character_safe(token_starts, context_from):
                context_from += 1
        overlap = start - context_from
        budget = min(limit, settings.sequence_len - context) - overlap
        if budget < 1:
            raise FragmentError(
                f"{context} tokens of context (the prompt before the last answer) and {overlap} of overlap leave no room "
                f"in sequence_len={settings.sequence_len}, max_fragment_len={limit}: raise them, shorten the prompt, "
                "or lower fragment_overlap"
            )
        end = total if total - start <= budget else _cut(start, start + budget, preferred, token_starts)
        spans.append(Span(context_from, start, end))
        start = end
    if settings.combine:
        spans = _combined(spans, context, settings.sequence_len)
    return context, spans


def _cut(start: int, furthest: int, preferred: set[int], token_starts: Sequence[int]) -> int:
    """The last `fragment_str` boundary in (start, furthest], else the last cut between characters,
    else `furthest` (one character longer than the whole budget: nothing else can be done)."""
    for position in range(furthest, start, -1):
        if position in preferred:
            return position
    for position in range(furthest, start, -1):
        if character_safe(token_starts, position):
            return position
    return furthest


def _combined(spans: list[Span], context: int, sequence_len: int) -> list[Span]:
    joined = [spans[0]]
    for span in spans[1:]:
        last = joined[-1]
        if context + span.end - last.context_from <= sequence_len:
            joined[-1] = Span(last.context_from, last.start, span.end)
        else:
            joined.append(span)
    return joined


def split_tokens(
    input_ids: Sequence[int], labels: Sequence[int], token_starts: Sequence[int], text: str, settings: FragmentSettings
) -> list[TokenizedConversation]:
    """The fragments of one tokenized document, in order (see the module docstring). A fragment
    that would train nothing (only the untrained tail after a chat's end-of-turn token) is left out."""
    context, spans = fragment_spans(labels, token_starts, text, settings)
    masked_context = [IGNORE_INDEX] * context
    fragments = []
    for index, span in enumerate(spans):
        fragment = TokenizedConversation(
            list(input_ids[:context]) + list(input_ids[span.context_from:span.end]),
            (list(labels[:context]) if index == 0 else masked_context)
            + [IGNORE_INDEX] * (span.start - span.context_from)
            + list(labels[span.start:span.end]),
        )
        if fragment.trained_tokens:
            fragments.append(fragment)
    return fragments


def token_offsets(
    tokenizer: Any, kind: str, messages: list[dict[str, Any]], roles_to_train: Sequence[str]
) -> tuple[str, list[int], list[int]]:
    """The text a row was tokenized from, its token ids and each token's first character, encoded
    the way `tasks.chat_tokens` encodes it (a chat's rendered template; text segments one by one,
    then the end-of-sequence token)."""
    encoder = ChatEncoder.of(tokenizer)
    backend = encoder.backend
    if kind == "chat":
        text = render_conversation(encoder, messages, roles_to_train).text
        encoding = backend.encode(text, add_special_tokens=False)
        return text, list(encoding.ids), [start for start, _ in encoding.offsets]
    text, ids, starts = "", [], []
    for segment in messages:
        encoding = backend.encode(segment["text"], add_special_tokens=False)
        ids.extend(encoding.ids)
        starts.extend(len(text) + start for start, _ in encoding.offsets)
        text += segment["text"]
    return text, ids + [encoder.eos_token_id], starts + [len(text)]


def split_row(tokenizer: Any, kind: str, messages: list[dict[str, Any]], roles_to_train: Sequence[str],
              tokens: TokenizedConversation, settings: FragmentSettings) -> list[TokenizedConversation]:
    """The fragments of a tokenized row too long for `sequence_len`.

    Raises:
        FragmentError: the row cannot be split (see `fragment_spans`), or re-encoding it for its
            character offsets gives other tokens than prep's (a tokenizer we cannot follow).
    """
    text, ids, starts = token_offsets(tokenizer, kind, messages, roles_to_train)
    if ids != list(tokens.input_ids):
        raise FragmentError("re-encoding the row for its character offsets gave other tokens; it cannot be split safely")
    return split_tokens(tokens.input_ids, tokens.labels, starts, text, settings)
