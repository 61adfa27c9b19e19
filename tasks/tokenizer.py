"""The run's tokenizer, built in one place: prep, train and everything after them see the same one.

`load_tokenizer(cfg)` applies, in Axolotl's order: `tokenizer_config` (another tokenizer than the
base model's), `special_tokens` (set or added: bos, eos, pad, unk, additional), `tokens` (plain
added tokens) and `chat_template` (the tokenizer's own, a named one carried here, or a jinja text).
The train stage saves this tokenizer with the adapter, so eval and export read the same one back.
When tokens were added, `load_model_for_training` grows the embeddings to `len(tokenizer)` and
trains the new rows (`new_token_count`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import RunConfig

# Our own renderings of the chat formats Axolotl users name most. Each renders a conversation so
# that every prefix renders as a prefix of it (prep finds turn boundaries that way), and puts the
# assistant header in the generation prompt.
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen_25": (
        "{% if messages and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}" + _CHATML
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Gemma 3 has no system role: a system message opens the first user turn.
    "gemma3": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<start_of_turn>user\n' + message['content'] | trim + '\n\n' }}{% else %}"
        "{% if not (loop.index0 == 1 and messages[0]['role'] == 'system' and message['role'] != 'assistant') %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}{% endif %}"
        "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi_3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "mistral_v1": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% endfor %}"
    ),
}


class TokenizerSettingError(ValueError):
    """A tokenizer setting cannot be applied (e.g. `tokenizer_default` on a tokenizer without a template)."""


def load_tokenizer(cfg: RunConfig, source: str | Path | None = None) -> Any:
    """The tokenizer of this run: `tokenizer_config` when set, else `source` (the base model's
    directory, default `base_model`), with the config's special tokens, added tokens and chat
    template applied."""
    from transformers import AutoTokenizer

    from tasks import hub

    if cfg.tokenizer_config:
        source = hub.resolve(cfg.tokenizer_config, what="tokenizer_config").path
    source = source or hub.base_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
    # transformers saves how the tokenizer was loaded (HF_HUB_OFFLINE shows up as local_files_only)
    # into tokenizer_config.json: an adapter trained online and offline would differ by that line.
    tokenizer.init_kwargs.pop("local_files_only", None)
    apply_token_settings(tokenizer, cfg)
    template = chat_template_text(cfg, tokenizer.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if cfg.chat_template_kwargs and tokenizer.chat_template:
        tokenizer.chat_template = with_template_variables(tokenizer.chat_template, cfg.chat_template_kwargs)
    return tokenizer


def with_template_variables(template: str, variables: dict[str, Any]) -> str:
    """The template with `chat_template_kwargs` (e.g. enable_thinking: false) set at its top, so that
    prep, the served model and the exported tokenizer all render with them."""
    import json

    settings = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}" for name, value in variables.items())
    return settings + template


def apply_token_settings(tokenizer: Any, cfg: RunConfig) -> None:
    """`special_tokens` set (and add when missing) the named special tokens; `tokens` adds plain ones."""
    from tokenizers import AddedToken

    special = cfg.special_tokens
    if special is not None:
        named = {name: getattr(special, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        named = {name: AddedToken(token, rstrip=False, lstrip=False, normalized=False, special=True)
                 for name, token in named.items() if token is not None}
        if named:
            tokenizer.add_special_tokens(named)
        if special.additional_special_tokens:
            added = [AddedToken(token, rstrip=False, lstrip=False, normalized=False, special=True)
                     for token in special.additional_special_tokens]
            tokenizer.add_tokens(added, special_tokens=True)
    if cfg.tokens:
        tokenizer.add_tokens([AddedToken(token, rstrip=False, lstrip=False, normalized=False) for token in cfg.tokens])


def chat_template_text(cfg: RunConfig, tokenizer_template: str | None) -> str | None:
    """The template to set, or None to keep the tokenizer's. `tokenizer_default_fallback_X` keeps the
    tokenizer's when it has one, else uses X."""
    name = cfg.chat_template
    if name is None:
        return None
    if name == "tokenizer_default":
        if not tokenizer_template:
            raise TokenizerSettingError(
                "`chat_template: tokenizer_default` but the tokenizer has no chat template; name one (e.g. chatml)"
            )
        return None
    if name.startswith("tokenizer_default_fallback_"):
        return None if tokenizer_template else NAMED_CHAT_TEMPLATES[name.removeprefix("tokenizer_default_fallback_")]
    if name == "jinja":
        text = cfg.chat_template_jinja or ""
        if "{" not in text and text.endswith(".jinja") and Path(text).is_file():
            return Path(text).read_text(encoding="utf-8")
        return text
    return NAMED_CHAT_TEMPLATES[name]


def new_token_count(tokenizer: Any, model: Any) -> int:
    """How many tokens the tokenizer has beyond the model's input embedding rows."""
    return max(0, len(tokenizer) - model.get_input_embeddings().num_embeddings)
