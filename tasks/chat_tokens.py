"""Chat template + tokenization with the loss masked to the trained turns.

Turn boundaries are those of rendering the conversation prefix by prefix with the model's own chat
template, so this works for any template, not only ones with `{% generation %}` markers. Rendering
every prefix of every row is slow, so a conversation of plain role/content messages is rendered
once: its boundaries come from a *skeleton*, the prefix renders of a conversation of the same roles
with placeholder contents, and the row's own render must equal the skeleton filled with its
contents (else, for a template whose output depends on the content, the prefixes are rendered).
The end-of-turn token after each trained turn stays in the labels: without it the model never
learns to stop.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import DataFamilyError

IGNORE_INDEX = -100
# Placeholder contents for skeletons: private-use characters no template or text produces.
_PLACEHOLDER = "\ue000{}\ue001"


class TemplateError(DataFamilyError):
    """The chat template renders a prefix that the full conversation does not start with."""


class ContentError(DataFamilyError):
    """A message holds text the tokenizer would read as a special token (e.g. a literal
    `<|im_end|>`): its turn would end early and the rest of the answer would go untrained."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        self.trained_tokens = len(self.labels) - self.labels.count(IGNORE_INDEX)

    def truncated(self, length: int) -> TokenizedConversation:
        return TokenizedConversation(self.input_ids[:length], self.labels[:length])


@dataclass
class RenderedConversation:
    text: str
    turns: list[tuple[int, int, bool]]  # (content start, turn end, trained) in characters of text


@dataclass
class ChatEncoder:
    """What tokenizing a row needs of a tokenizer: the Rust tokenizer, the chat template and the
    special tokens. It pickles to the size of `tokenizer.json` and needs no `transformers` model
    classes, so prep's worker processes receive it once and start in about a second.

    `render` is `tokenizer.apply_chat_template(messages, tokenize=False)`: the same compiled
    template with the same variables (for plain role/content messages the transformers wrapper
    only copies them, so they go to the compiled template directly, 3x faster)."""

    backend: Any  # tokenizers.Tokenizer
    chat_template: str | None
    special_tokens_map: dict[str, Any]
    special_tokens: tuple[str, ...]
    eos_token_id: int
    _skeletons: dict[tuple[str, ...], _Skeleton | None] = field(default_factory=dict, repr=False)
    _compiled: Any = field(default=None, repr=False)
    _special_pattern: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, tokenizer: Any) -> ChatEncoder:
        """The encoder of a transformers tokenizer (or the encoder itself)."""
        if isinstance(tokenizer, ChatEncoder):
            return tokenizer
        try:
            template = tokenizer.get_chat_template()
        except ValueError:  # no template: only plain-text rows can be tokenized
            template = None
        return cls(tokenizer.backend_tokenizer, template, dict(tokenizer.special_tokens_map),
                   tuple(tokenizer.all_special_tokens), tokenizer.eos_token_id)

    def to_json(self) -> str:
        """The encoder as JSON (the Rust tokenizer's own JSON inside): what prep keeps beside its chunks."""
        return json.dumps({"tokenizer": self.backend.to_str(), "chat_template": self.chat_template,
                           "special_tokens_map": self.special_tokens_map, "special_tokens": list(self.special_tokens),
                           "eos_token_id": self.eos_token_id})

    @classmethod
    def from_json(cls, text: str) -> ChatEncoder:
        from tokenizers import Tokenizer

        saved = json.loads(text)
        return cls(Tokenizer.from_str(saved["tokenizer"]), saved["chat_template"], saved["special_tokens_map"],
                   tuple(saved["special_tokens"]), saved["eos_token_id"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_skeletons": {}, "_compiled": None, "_special_pattern": None}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        if self.chat_template is None:
            raise TemplateError("the tokenizer has no chat template; set `chat_template` in the config (e.g. chatml)")
        if _plain(messages):
            if self._compiled is None:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = _compile_jinja_template(self.chat_template)
            return self._compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens_map)
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        return rendered[0]

    def skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        if roles not in self._skeletons:
            self._skeletons[roles] = _Skeleton.of(self, roles)
        return self._skeletons[roles]


def _plain(messages: list[dict[str, Any]]) -> bool:
    return all(len(message) == 2 and type(message.get("content")) is str and type(message.get("role")) is str for message in messages)


@dataclass
class _Skeleton:
    """The render of a conversation of these roles, cut at each message's content: `pieces[0] +
    content[order[0]] + pieces[1] + ...` is the text; each turn boundary is a position in the
    placeholder render plus how many contents precede it."""

    pieces: list[str]
    order: list[int]  # message index of each slot, in text order
    boundaries: list[tuple[tuple[int, int], tuple[int, int]]]  # per turn: (position, slots before) of its content start and end

    @classmethod
    def of(cls, encoder: ChatEncoder, roles: tuple[str, ...]) -> _Skeleton | None:
        placeholders = [_PLACEHOLDER.format(index) for index in range(len(roles))]
        try:
            rendered = _render_by_prefixes(encoder, [{"role": role, "content": text} for role, text in zip(roles, placeholders)], ())
        except Exception:  # noqa: BLE001 - a template that refuses these roles: every row renders the slow way, and fails there
            return None
        slots = []
        for index, placeholder in enumerate(placeholders):
            if rendered.text.count(placeholder) != 1:
                return None
            slots.append((rendered.text.index(placeholder), index))
        slots.sort()
        pieces, cursor = [], 0
        for start, index in slots:
            pieces.append(rendered.text[cursor:start])
            cursor = start + len(placeholders[index])
        pieces.append(rendered.text[cursor:])
        ends = [start + len(placeholders[index]) for start, index in slots]

        def located(position: int) -> tuple[int, int] | None:
            before = sum(end <= position for end in ends)
            inside = any(start < position < end for (start, _), end in zip(slots, ends))
            return None if inside else (position, before)

        boundaries = []
        for content_start, turn_end, _ in rendered.turns:
            start, end = located(content_start), located(turn_end)
            if start is None or end is None:
                return None
            boundaries.append((start, end))
        return cls(pieces, [index for _, index in slots], boundaries)

    def fill(self, contents: list[str], trained: list[bool]) -> RenderedConversation:
        parts = [self.pieces[0]]
        for slot, index in enumerate(self.order):
            parts += [contents[index], self.pieces[slot + 1]]
        # shift[k]: how much the first k slots' contents lengthen the text against the placeholders.
        shift = [0]
        for index in self.order:
            shift.append(shift[-1] + len(contents[index]) - len(_PLACEHOLDER.format(index)))
        turns = [(start + shift[start_before], end + shift[end_before], is_trained)
                 for ((start, start_before), (end, end_before)), is_trained in zip(self.boundaries, trained)]
        return RenderedConversation("".join(parts), turns)


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    roles_to_train: tuple[str, ...] | list[str] = ("assistant",),
    train_on_eos: str = "turn",
    train_on_inputs: bool = False,
) -> TokenizedConversation:
    """Tokens of the rendered conversation; labels keep the trained turns' contents (or every
    token, with `train_on_inputs`). `train_on_eos`: the end-of-turn token of each trained turn
    ("turn"), of the last trained turn only ("last"), of every turn ("all"), or of none ("none")."""
    rendered = render_conversation(tokenizer, messages, roles_to_train)
    return tokenize_rendered(tokenizer, [rendered], train_on_eos, train_on_inputs)[0]


def render_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], roles_to_train: tuple[str, ...] | list[str]
) -> RenderedConversation:
    """The chat-template text and where each turn's content starts and its turn ends: from the
    skeleton of its roles where the row's one render matches it, else by rendering every prefix."""
    encoder = ChatEncoder.of(tokenizer)
    _refuse_special_tokens(encoder, [message["content"] for message in messages])
    if _plain(messages):
        skeleton = encoder.skeleton(tuple(message["role"] for message in messages))
        if skeleton is not None:
            filled = skeleton.fill([message["content"] for message in messages],
                                   [message["role"] in roles_to_train for message in messages])
            if filled.text == encoder.render(messages):
                return filled
    return _render_by_prefixes(encoder, messages, roles_to_train)


def _render_by_prefixes(
    encoder: ChatEncoder, messages: list[dict[str, Any]], roles_to_train: tuple[str, ...] | list[str]
) -> RenderedConversation:
    text = ""
    turns = []
    for index, message in enumerate(messages):
        turn_text = encoder.render(messages[: index + 1])
        if not turn_text.startswith(text):
            raise TemplateError("the chat template renders a conversation differently from its prefixes; turn boundaries cannot be found")
        if message["role"] == "assistant":
            # The generation prompt ("<|im_start|>assistant\n") belongs to the prompt, not the answer.
            prompt_text = encoder.render(messages[:index], add_generation_prompt=True) if index else ""
            if not turn_text.startswith(prompt_text):
                raise TemplateError("the chat template's generation prompt is not a prefix of the assistant turn")
            content_start = len(prompt_text)
        else:
            found = turn_text.find(message["content"], len(text))
            content_start = found if found >= 0 else len(text)
        turns.append((content_start, len(turn_text), message["role"] in roles_to_train))
        text = turn_text
    return RenderedConversation(text, turns)


def tokenize_rendered(
    tokenizer: Any, conversations: list[RenderedConversation], train_on_eos: str = "turn", train_on_inputs: bool = False
) -> list[TokenizedConversation]:
    """Encodes rendered conversations in one batch (the Rust tokenizer spreads a batch over the
    cores) and masks the labels to the trained turns."""
    encoder = ChatEncoder.of(tokenizer)
    encodings = encoder.backend.encode_batch([c.text for c in conversations], add_special_tokens=False)
    tokenized = []
    for conversation, encoding in zip(conversations, encodings):
        input_ids = encoding.ids
        if train_on_inputs:
            tokenized.append(TokenizedConversation(input_ids, list(input_ids)))
            continue
        # Turns that are neither trained nor keep their end token leave their labels at -100.
        turns = [(_first_token_at(encoding, start), _first_token_at(encoding, end), trained)
                 if trained or train_on_eos == "all" else (0, 0, False) for start, end, trained in conversation.turns]
        tokenized.append(_labelled(input_ids, turns, encoder.eos_token_id, train_on_eos))
    return tokenized


def _first_token_at(encoding: Any, position: int) -> int:
    """The first token that starts at or after character `position` (what `bisect_left` over the
    tokens' start offsets gives), asked of the Rust encoding instead of converting every offset."""
    token = encoding.char_to_token(position)
    if token is None:  # past the end, or a character no token covers
        return bisect_left([start for start, _ in encoding.offsets], position)
    start = encoding.token_to_chars(token)[0]
    if start < position:
        return token + 1
    # Several tokens can start at the same character (the bytes of one multi-byte character).
    while token > 0 and encoding.token_to_chars(token - 1)[0] >= position:
        token -= 1
    return token


def _labelled(input_ids: list[int], turns: list[tuple[int, int, bool]], end_of_turn: int, train_on_eos: str) -> TokenizedConversation:
    """Labels of one conversation from its turns as token ranges (content start, turn end, trained)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    last_trained = max((i for i, turn in enumerate(turns) if turn[2]), default=-1)
    for turn_index, (first, end, trained) in enumerate(turns):
        keep_eos = train_on_eos == "all" or (
            trained and (train_on_eos == "turn" or (train_on_eos == "last" and turn_index == last_trained))
        )
        # The template may add text after the end-of-turn token (ChatML adds a newline); the
        # model should learn to stop at the end-of-turn token, not to produce what follows it.
        try:
            stop = input_ids.index(end_of_turn, first, end) if first < end else end
        except ValueError:
            stop = end
        if trained:
            labels[first:stop] = input_ids[first:stop]
        if stop < end and keep_eos:
            labels[stop] = end_of_turn
    return TokenizedConversation(input_ids, labels)


def tokenize_segments(tokenizer: Any, segments: list[dict[str, Any]], train_on_inputs: bool = False) -> TokenizedConversation:
    """Plain text (`completion`, `input_output`): segments tokenized in order, each trained or not;
    an end-of-sequence token closes the row and is trained, so the model learns to stop."""
    encoder = ChatEncoder.of(tokenizer)
    _refuse_special_tokens(encoder, [segment["text"] for segment in segments])
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = encoder.backend.encode(segment["text"], add_special_tokens=False).ids
        input_ids.extend(ids)
        labels.extend(ids if segment["train"] or train_on_inputs else [IGNORE_INDEX] * len(ids))
    input_ids.append(encoder.eos_token_id)
    labels.append(encoder.eos_token_id)
    return TokenizedConversation(input_ids, labels)


def _refuse_special_tokens(encoder: ChatEncoder, texts: list[str]) -> None:
    # One regular expression of every special token (Llama 3 has 256): one scan per text.
    if encoder._special_pattern is None:
        encoder._special_pattern = re.compile("|".join(re.escape(token) for token in sorted(encoder.special_tokens, key=len, reverse=True))
                                              or r"(?!)")
    for text in texts:
        if found := encoder._special_pattern.search(text):
            raise ContentError(f"content holds the special token {found.group()!r} as text; remove or escape it")
