"""The pipeline's stages, declared: prep -> train -> eval -> export.

Each declaration says what decides the stage's output (see `tasks.stage`). Only light modules are
imported here, so computing every key of a cached run costs file hashes (memoised) and no torch.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from tasks import hub
from tasks.config import RunConfig
from tasks.contracts import contract_path
from tasks.fingerprint import FileHasher
from tasks.stage import Stage

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab*", "merges.txt", "*.model")
# Libraries whose version can change what a stage computes: an upgrade re-runs the stage.
TOKENIZE_LIBRARIES = ("transformers", "tokenizers")
MODEL_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tokenizer_identity(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    """A hub model's revision, or the hash of a local model's tokenizer files (never its weights);
    of `tokenizer_config` where set, else of the base model."""
    model = hub.resolve(cfg.tokenizer_config, what="tokenizer_config") if cfg.tokenizer_config else hub.base_model(cfg)
    if model.commit is not None:
        return model.identity(hasher)
    files = sorted({path for pattern in TOKENIZER_FILES for path in model.path.glob(pattern) if path.is_file()})
    return {path.name: hasher.file(path) for path in files}


def source_identity(reference: str, hasher: FileHasher) -> Any:
    """A file's or directory's content hash, or a hub dataset's resolved commit."""
    path = Path(reference)
    if not path.exists() and hub.is_hub_id(reference):
        return hub.resolve(reference, what="datasets[].path", repo_type="dataset").identity(hasher)
    return hasher.tree(path) if path.is_dir() else hasher.file(path)


def prep_inputs(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    contract_dir = Path(cfg.contract.dir)
    return {
        "sources": [source_identity(dataset.path, hasher) for dataset in cfg.datasets],
        "contracts": [hasher.file(contract_path(contract_dir, d.contract)) if d.contract else None for d in cfg.datasets],
        "tokenizer": tokenizer_identity(cfg, hasher),
        "libraries": library_versions(TOKENIZE_LIBRARIES),
        # The pinned test set: prep drops its rows from training and publishes its items.
        **({"test_set": _test_set_identity(cfg, hasher)} if cfg.eval.test_set else {}),
    }


def _test_set_identity(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    test_set = cfg.eval.test_set
    assert test_set is not None
    return {
        "file": source_identity(Path(test_set.path), hasher),
        "format": test_set.model_dump(mode="json", exclude={"path"}),
        "contract": hasher.file(contract_path(Path(cfg.contract.dir), test_set.contract)) if test_set.contract else None,
    }


def train_inputs(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    from tasks.launch import plan_processes, read_deepspeed_config

    return {
        "base_model": hub.base_model(cfg).identity(hasher),
        # A warm start's adapter and a replaced model config decide the trained weights as much.
        **{name: hub.resolve(getattr(cfg, name), what=name).identity(hasher)
           for name in ("lora_model_dir", "base_model_config") if getattr(cfg, name)},
        # The effective batch is per process: other process counts (on all machines) train another model.
        "processes": plan_processes(cfg).processes,
        # The DeepSpeed JSON's content, not its path.
        "deepspeed": read_deepspeed_config(cfg) if cfg.deepspeed else None,
        "libraries": library_versions(MODEL_LIBRARIES),
    }


def model_inputs(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    """For stages that load the base model again (eval serves it, export merges into it)."""
    return {"base_model": hub.base_model(cfg).identity(hasher), "libraries": library_versions(MODEL_LIBRARIES)}


# Libraries that read the inference formats back (their versions decide what the checks measure).
FORMAT_LIBRARIES = ("compressed-tensors", "gguf")


def export_inputs(cfg: RunConfig, hasher: FileHasher) -> dict[str, Any]:
    inputs = model_inputs(cfg, hasher)
    if cfg.export.quantize:
        inputs["format_libraries"] = library_versions(FORMAT_LIBRARIES)
    return inputs


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """Eval metrics less the wall-clock ones (latency): an eval re-run that gets the same answers
    must not re-export."""
    return {role: {name: value for name, value in values.items() if not name.startswith("latency_")}
            for role, values in metrics.items()}


PREP = Stage(
    name="prep",
    upstream=(),
    code=("prep", "prep_chunks", "contract_chunks", "formats", "chat_tokens", "fragments", "tokenizer", "contracts", "packing", "shards"),
    build="tasks.prep:build",
    inputs=prep_inputs,
    # Train reads the shards, eval and export the val items.
    reads=lambda m: {"train": [s["sha256"] for s in m["train_shards"]], "val": [s["sha256"] for s in m["val_shards"]],
                     "val_items": m["val_items_sha256"], "test_items": m.get("test_items_sha256"),
                     "probe_items": m.get("probe_items_sha256")},
    report="tasks.prep:report",
    description="sources -> contract -> messages -> tokens -> split -> packed Arrow shards",
)

TRAIN = Stage(
    name="train",
    upstream=("prep",),
    code=("train", "trainer", "checkpoints", "launch", "train_worker", "progress", "packing", "shards", "quantization"),
    build="tasks.train:build",
    inputs=train_inputs,
    # The adapter, and the eval loss that eval reports: a retrain that reproduces both changes nothing downstream.
    reads=lambda m: {"adapter": m["adapter_sha256"], "adapter_kind": m["adapter"], "eval_loss": m["eval_loss"],
                     "eval_perplexity": m["eval_perplexity"]},
    resumable=True,
    uses_gpu=True,
    multi_node=True,
    description="LoRA / QLoRA on packed rows, resumable",
)

EVAL = Stage(
    name="eval",
    upstream=("prep", "train"),
    code=("eval", "eval_client", "eval_metrics", "judge", "serving", "merge", "quantization"),
    build="tasks.eval:build",
    inputs=model_inputs,
    # How requests are made never changes an answer, and key names are not keys.
    settings_ignored=tuple(
        f"eval.{section}{name}" for section in ("", "judge.")
        for name in ("concurrency", "request_timeout", "max_retries", "startup_timeout", "api_key_env", "api_key_secret", "budget_usd")
    ),
    # The metrics, and the settings they were scored with (the model card records both).
    reads=lambda m: {"metrics": without_timings(m["metrics"]), "eval_loss": m.get("eval_loss"),
                     "eval_perplexity": m.get("eval_perplexity"), "settings": m["key_parts"]["settings"],
                     "test_set": without_timings((m.get("test_set") or {}).get("metrics", {})), "items": m.get("items_sha256")},
    report="tasks.eval:report",
    uses_gpu=True,
    description="the tuned (and base) model behind an OpenAI-compatible endpoint, scored",
)

EXPORT = Stage(
    name="export",
    upstream=("prep", "train", "eval"),
    code=("export", "merge", "model_card", "quantization", "inference_formats", "format_workers"),
    build="tasks.export:build",
    inputs=export_inputs,
    # What happens after the export (the gate, the registry, the hub push on promotion), not its files;
    # and where the format tools are installed (a location, not what they write).
    settings_ignored=("export.registry", "export.registry_dir", "export.promote_if", "export.hub_private", "export.hub_token_env",
                      "hub_model_id", "export.llmcompressor_python", "export.gguf_converter"),
    reads=lambda m: {"model": m["model_sha256"], "formats": m.get("formats_sha256", {})},
    uses_gpu=True,
    description="adapter merged, verified, written with its model card",
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PREP, TRAIN, EVAL, EXPORT)}
