"""Chat template + tokenization with the loss masked to the trained turns.

Turn boundaries are found by rendering the conversation prefix by prefix with the model's own chat
template, so this works for any template, not only ones with `{% generation %}` markers. The
end-of-turn token after each trained turn stays in the labels: without it the model never learns
to stop.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from tasks.errors import DataFamilyError

IGNORE_INDEX = -100


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
    tokenizer: Any, messages: list[dict[str, str]], roles_to_train: tuple[str, ...] | list[str]
) -> RenderedConversation:
    """The chat-template text and where each turn's content starts and its turn ends, found by
    rendering the conversation prefix by prefix."""
    _refuse_special_tokens(tokenizer, [message["content"] for message in messages])
    text = ""
    turns = []
    for index, message in enumerate(messages):
        turn_text = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not turn_text.startswith(text):
            raise TemplateError("the chat template renders a conversation differently from its prefixes; turn boundaries cannot be found")
        if message["role"] == "assistant":
            # The generation prompt ("<|im_start|>assistant\n") belongs to the prompt, not the answer.
            prompt_text = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
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
    encodings = tokenizer.backend_tokenizer.encode_batch([c.text for c in conversations], add_special_tokens=False)
    return [
        _labelled(encoding.ids, [start for start, _ in encoding.offsets], conversation.turns, tokenizer.eos_token_id,
                  train_on_eos, train_on_inputs)
        for conversation, encoding in zip(conversations, encodings)
    ]


def _labelled(
    input_ids: list[int], token_starts: list[int], turns: list[tuple[int, int, bool]], end_of_turn: int,
    train_on_eos: str, train_on_inputs: bool,
) -> TokenizedConversation:
    if train_on_inputs:
        return TokenizedConversation(input_ids, list(input_ids))
    labels = [IGNORE_INDEX] * len(input_ids)
    last_trained = max((i for i, turn in enumerate(turns) if turn[2]), default=-1)
    for turn_index, (content_start, turn_end, trained) in enumerate(turns):
        keep_eos = train_on_eos == "all" or (
            trained and (train_on_eos == "turn" or (train_on_eos == "last" and turn_index == last_trained))
        )
        for position in range(bisect_left(token_starts, content_start), bisect_left(token_starts, turn_end)):
            # The template may add text after the end-of-turn token (ChatML adds a newline); the
            # model should learn to stop at the end-of-turn token, not to produce what follows it.
            if input_ids[position] == end_of_turn:
                if keep_eos:
                    labels[position] = end_of_turn
                break
            if trained:
                labels[position] = input_ids[position]
    return TokenizedConversation(input_ids, labels)


def tokenize_segments(tokenizer: Any, segments: list[dict[str, Any]], train_on_inputs: bool = False) -> TokenizedConversation:
    """Plain text (`completion`, `input_output`): segments tokenized in order, each trained or not;
    an end-of-sequence token closes the row and is trained, so the model learns to stop."""
    _refuse_special_tokens(tokenizer, [segment["text"] for segment in segments])
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids, _ = _encode(tokenizer, segment["text"])
        input_ids.extend(ids)
        labels.extend(ids if segment["train"] or train_on_inputs else [IGNORE_INDEX] * len(ids))
    input_ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return TokenizedConversation(input_ids, labels)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids and each token's first character, through the Rust tokenizer directly (the
    Python wrapper costs more than the encoding itself on short rows)."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]


def _refuse_special_tokens(tokenizer: Any, texts: list[str]) -> None:
    for special in tokenizer.all_special_tokens:
        for text in texts:
            if special in text:
                raise ContentError(f"content holds the special token {special!r} as text; remove or escape it")
