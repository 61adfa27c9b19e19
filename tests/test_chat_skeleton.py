"""The one-render path of `tasks.chat_tokens`: a conversation's turn boundaries come from the
skeleton of its roles when its render matches, and from prefix renders otherwise; both must give
the same text and boundaries as rendering every prefix with `apply_chat_template`."""

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from tasks.chat_tokens import ChatEncoder, _render_by_prefixes, render_conversation, tokenize_conversation

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = [json.loads(line)["messages"] for line in (REPO_ROOT / "examples" / "quickstart-zh" / "finance_analysis_zh.jsonl").open()][:50]
MULTI_TURN = [
    {"role": "system", "content": "  Answer briefly.  "},
    {"role": "user", "content": "Nimbus Cloud posts record profit"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "assistant"},  # content equal to a role name: found in the header by a naive search
    {"role": "assistant", "content": "That one is negative.\n"},
]


def test_a_chatml_conversation_takes_the_skeleton_and_matches_the_prefix_renders(tiny_tokenizer: Any) -> None:
    encoder = ChatEncoder.of(tiny_tokenizer)
    assert encoder.skeleton(("system", "user", "assistant")) is not None
    for messages in [*ROWS, MULTI_TURN]:
        assert render_conversation(encoder, messages, ["assistant"]) == _render_by_prefixes(encoder, messages, ["assistant"])
        assert encoder.render(messages) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_a_template_that_changes_the_content_falls_back_to_prefix_renders(tiny_tokenizer: Any) -> None:
    """Llama-3-style `| trim`: the skeleton's text differs from the row's render, so the prefixes decide."""
    encoder = ChatEncoder.of(tiny_tokenizer)
    encoder.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rendered = render_conversation(encoder, MULTI_TURN, ["assistant"])
    assert rendered == _render_by_prefixes(encoder, MULTI_TURN, ["assistant"])
    assert "Answer briefly.<|im_end|>" in rendered.text


@pytest.mark.parametrize("roles_to_train", [["assistant"], ["user", "assistant"]])
def test_the_encoder_pickles_and_tokenizes_like_the_tokenizer(tiny_tokenizer: Any, roles_to_train: list[str]) -> None:
    encoder = pickle.loads(pickle.dumps(ChatEncoder.of(tiny_tokenizer)))
    for messages in ROWS[:10] + [MULTI_TURN]:
        from_encoder = tokenize_conversation(encoder, messages, roles_to_train)
        from_tokenizer = tokenize_conversation(tiny_tokenizer, messages, roles_to_train)
        assert (from_encoder.input_ids, from_encoder.labels) == (from_tokenizer.input_ids, from_tokenizer.labels)


def test_the_encoder_saved_as_json_tokenizes_like_the_tokenizer(tiny_tokenizer: Any) -> None:
    encoder = ChatEncoder.from_json(ChatEncoder.of(tiny_tokenizer).to_json())
    for messages in ROWS[:10] + [MULTI_TURN]:
        restored, original = tokenize_conversation(encoder, messages), tokenize_conversation(tiny_tokenizer, messages)
        assert (restored.input_ids, restored.labels) == (original.input_ids, original.labels)
