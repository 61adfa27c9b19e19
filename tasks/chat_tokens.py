"""Chat template + tokenization with the loss masked to the trained turns.

Turn boundaries are found by rendering the conversation prefix by prefix with the model's own chat
template, so this works for any template, not only ones with `{% generation %}` markers. The
end-of-turn token after each trained turn stays in the labels: without it the model never learns
to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template renders a prefix that the full conversation does not start with."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def truncated(self, length: int) -> TokenizedConversation:
        return TokenizedConversation(self.input_ids[:length], self.labels[:length])


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    roles_to_train: tuple[str, ...] | list[str] = ("assistant",),
    train_on_eos: str = "turn",
    train_on_inputs: bool = False,
) -> TokenizedConversation:
    """Tokens of the rendered conversation; labels keep the trained turns (or everything, with
    `train_on_inputs`). `train_on_eos`: the end-of-turn token of each trained turn ("turn"), of
    the last trained turn only ("last"), of every turn ("all"), or of none ("none")."""
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    turn_spans = []  # (start, end, trained) in characters of full_text
    for index, message in enumerate(messages):
        prompt_text = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        turn_text = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if message["role"] == "assistant" and index and not turn_text.startswith(prompt_text):
            raise TemplateError("the chat template does not render conversations prefix by prefix; turn boundaries cannot be found")
        if not full_text.startswith(turn_text):
            raise TemplateError("the chat template renders a conversation differently from its prefixes; turn boundaries cannot be found")
        # The generation prompt (e.g. "<|im_start|>assistant\n") belongs to the prompt, not the turn.
        start = len(prompt_text) if message["role"] == "assistant" else (turn_spans[-1][1] if turn_spans else 0)
        turn_spans.append((start, len(turn_text), message["role"] in roles_to_train))

    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    if train_on_inputs:
        return TokenizedConversation(input_ids, list(input_ids))
    labels = [IGNORE_INDEX] * len(input_ids)
    end_of_turn = tokenizer.eos_token_id
    last_trained = max((i for i, span in enumerate(turn_spans) if span[2]), default=-1)
    offsets = encoding["offset_mapping"]
    for turn_index, (span_start, span_end, trained) in enumerate(turn_spans):
        positions = [i for i, (start, _) in enumerate(offsets) if span_start <= start < span_end]
        keep_eos = train_on_eos == "all" or (
            trained and (train_on_eos == "turn" or (train_on_eos == "last" and turn_index == last_trained))
        )
        for position in positions:
            # The template may add text after the end-of-turn token (ChatML adds a newline); the
            # model should learn to stop at the end-of-turn token, not to produce what follows it.
            if input_ids[position] == end_of_turn:
                if keep_eos:
                    labels[position] = input_ids[position]
                break
            if trained:
                labels[position] = input_ids[position]
    return TokenizedConversation(input_ids, labels)


def tokenize_segments(tokenizer: Any, segments: list[dict[str, Any]], train_on_inputs: bool = False) -> TokenizedConversation:
    """Plain text (`completion`, `input_output`): segments tokenized in order, each trained or not;
    an end-of-sequence token closes the row and is trained, so the model learns to stop."""
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = tokenizer(segment["text"], add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if segment["train"] or train_on_inputs else [IGNORE_INDEX] * len(ids))
    input_ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return TokenizedConversation(input_ids, labels)
