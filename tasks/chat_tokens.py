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


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], roles_to_train: tuple[str, ...] = ("assistant",)
) -> TokenizedConversation:
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    trained_spans = []
    for index, message in enumerate(messages):
        if message["role"] not in roles_to_train:
            continue
        prompt_text = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        turn_text = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix; "
                "turn boundaries cannot be found for it"
            )
        trained_spans.append((len(prompt_text), len(turn_text)))

    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    end_of_turn = tokenizer.eos_token_id
    for span_start, span_end in trained_spans:
        positions = [i for i, (start, _) in enumerate(encoding["offset_mapping"]) if span_start <= start < span_end]
        # The template may add text after the end-of-turn token (ChatML adds a newline); the model
        # should learn to stop at the end-of-turn token, not to produce what follows it.
        for position in positions:
            labels[position] = input_ids[position]
            if input_ids[position] == end_of_turn:
                break
    return TokenizedConversation(input_ids, labels)
