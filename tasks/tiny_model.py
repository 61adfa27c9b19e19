"""A tiny random-weight Llama with a locally trained tokenizer.

There is no model hub in our test and quickstart environments, so the pipeline needs a base model
it can build from nothing. It is small enough to train on a CPU in seconds, yet it is a real
Hugging Face causal LM: it loads with the ``Auto*`` classes, has a ChatML chat template and can be
served by ``transformers serve``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tasks import atomic
from tasks.errors import StageFailedError

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)
TARGET_VOCAB_SIZE = 2048
MAX_POSITION_EMBEDDINGS = 2048
# Kana, CJK punctuation (U+3000-303F), Han ideographs, full-width forms (U+FF00-FFEF).
CJK_CHARACTER_PATTERN = "[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A build reaches ``output_dir`` only by renaming a whole temporary directory, so a directory
# holding these files is a finished build; anything else is not ours to trust.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# Always part of the tokenizer's training text, so a build without corpus files still learns the
# words of chat roles, sentiment labels and financial headlines instead of only raw bytes.
BUILTIN_CORPUS = """\
system user assistant
Classify the sentiment of the financial headline. Answer with one word: positive, negative or neutral.
positive negative neutral
The company reported record profit for the third quarter and raised its full-year guidance.
Shares surged 12% after the retailer beat analyst estimates on revenue and earnings.
The bank cut its dividend and warned that loan losses would rise next year.
Shares plunged 18% after the chipmaker missed estimates and cut its outlook.
The airline filed for bankruptcy protection after talks with creditors collapsed.
The automaker recalls 40,000 vehicles over a faulty brake sensor.
The board appointed a new chief financial officer effective next month.
The company will hold its annual meeting of shareholders on May 14.
The insurer announced the date of its fourth-quarter earnings call.
The group relocates its headquarters to a new office in the city centre.
Revenue rose 8% year over year to $2.4 billion, ahead of the consensus forecast.
Net income fell 23% to $310 million as costs climbed faster than sales.
Operating margin was unchanged at 14.5% for the first half of the fiscal year.
Analysts upgraded the stock to buy and lifted their price target to $85.
Analysts downgraded the stock to sell, citing weak demand and rising inventories.
The central bank left interest rates unchanged, in line with market expectations.
Bond yields climbed as investors priced in further rate hikes by the Federal Reserve.
The merger is expected to close in the second quarter, subject to regulatory approval.
The regulator opened an investigation into the lender's accounting practices.
The firm announced a share buyback programme worth $500 million.
Quarterly sales missed expectations as shipments slowed in Europe and Asia.
The company expects earnings per share of $1.10 to $1.20 for the full year.
Trading in the shares was halted pending an announcement.
The oil producer posted a net loss of $75 million on lower crude prices.
The software maker signed a multi-year contract with a major government agency.
Profit warnings from several suppliers weighed on the sector on Tuesday.
The stock closed flat at $42.10 on volume in line with its 30-day average.
The fund manager reported inflows of $3 billion in the quarter ended March 31.
Credit rating agencies affirmed the utility's investment-grade rating with a stable outlook.
The pharmaceutical group won approval for its new drug and shares jumped 9%.
The retailer will close 120 stores and cut 2,000 jobs to reduce costs.
The conglomerate plans to spin off its industrial unit into a separately listed company.
Dividends will be paid on June 30 to shareholders of record on June 15.
The startup raised $60 million in a funding round led by a venture capital firm.
Inflation eased to 3.1% in October, below the forecast of economists.
The mining company lowered its production forecast after flooding at two sites.
The payments firm reported strong growth in transaction volumes and active customers.
The board of directors declared a regular quarterly dividend of $0.25 per share.
Markets were mixed as investors waited for the jobs report on Friday.
"""


class TinyModelError(StageFailedError):
    """Raised when the tiny model cannot be built where it was asked for."""


def build_tiny_model(output_dir: Path, *, seed: int = 0, corpus_files: Sequence[Path] = ()) -> Path:
    """Build the tiny model into ``output_dir`` and return ``output_dir``.

    The same ``seed`` and the same ``corpus_files`` (JSONL; every string value of every row is
    tokenizer training text) give byte-identical files, so the directory can be part of a cache
    key. If ``output_dir`` already holds a complete build it is returned untouched. Otherwise the
    model is written into a temporary sibling directory and renamed into place, so a killed run
    never leaves a half-written model behind; stale temporary directories of dead processes are
    removed.

    Raises:
        TinyModelError: ``output_dir`` exists, is not empty and is not a complete build.
    """
    output_dir = Path(output_dir)
    if _is_complete(output_dir):
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(output_dir)
    temp_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    temp_dir.mkdir()
    try:
        _write_model(temp_dir, seed=seed, corpus_files=corpus_files)
        _move_into_place(temp_dir, output_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return output_dir


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def _remove_stale_temp_dirs(output_dir: Path) -> None:
    """Delete temp dirs left by killed builds; a live process's temp dir is its own business."""
    prefix = f".{output_dir.name}.tmp-"
    for candidate in output_dir.parent.glob(f"{prefix}*"):
        pid_text = candidate.name.removeprefix(prefix)
        if not pid_text.isdigit() or (int(pid_text) != os.getpid() and _process_alive(int(pid_text))):
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Signal 0 delivers nothing; it only asks the kernel whether the pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _move_into_place(temp_dir: Path, output_dir: Path) -> None:
    """Rename ``temp_dir`` to ``output_dir``; losing a race to another complete build is fine."""
    if atomic.publish_dir(temp_dir, output_dir) or _is_complete(output_dir):
        return
    raise TinyModelError(
        f"{output_dir} exists and is not a complete tiny model (missing one of "
        f"{', '.join(REQUIRED_FILES)}); remove it or choose another output directory"
    )


def _write_model(model_dir: Path, *, seed: int, corpus_files: Sequence[Path]) -> None:
    tokenizer = _train_tokenizer(corpus_files)
    pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        # With the usual 0.02, a 128-wide random lm_head caps logits near +-3, so no adapter can make
        # the model confident; 0.1 lets a LoRA fine-tune reach the low losses a real model would.
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )
    # fork_rng keeps the caller's global RNG state as it was: seeding is this build's concern.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    tokenizer.save_pretrained(model_dir)
    model.save_pretrained(model_dir)


def _train_tokenizer(corpus_files: Sequence[Path]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Each CJK character (and CJK/full-width punctuation) is a pre-token of its own: BPE merges its
    # UTF-8 bytes into one token but never merges across characters. Without this a run of Chinese
    # text is one pre-token, and on a small repetitive corpus the 2k vocab fills with whole phrases
    # (`该消息对公司的影响偏正面` as one token) while unseen words fall back to partial-character
    # bytes. Characters recombine into any word, and match the character-level ROUGE-L of eval.
    # Text without CJK (the English quickstart) is tokenized exactly as by ByteLevel alone.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_texts(corpus_files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        chat_template=CHATML_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def _corpus_texts(corpus_files: Sequence[Path]) -> Iterator[str]:
    yield from BUILTIN_CORPUS.splitlines()
    for corpus_file in corpus_files:
        with Path(corpus_file).open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield from _strings_in(json.loads(line))


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)
