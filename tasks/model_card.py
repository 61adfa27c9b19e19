"""The exported model's card (README.md) and its lineage: where every part of the model came from.

The lineage names the base model's hub revision (or the local files' hash), the digests of the
data and adapter it was built from, every stage key, the versions of the libraries that produced
it, and the loraflow code and git commit, so a model in production can be traced and rebuilt.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from tasks import hub
from tasks.config import RunConfig, stage_settings
from tasks.fingerprint import TASKS_DIR, FileHasher, code_version
from tasks.stages import MODEL_LIBRARIES, STAGES, library_versions


def lineage(cfg: RunConfig, upstream: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = hub.base_model(cfg)
    return {
        "base_model": {**base.lineage(), "identity": base.identity(FileHasher())},
        "adapter": upstream["train"].get("adapter", cfg.adapter),
        "data_digest": upstream["prep"]["output_digest"],
        "adapter_digest": upstream["train"]["output_digest"],
        "stage_keys": {name: manifest["fingerprint"] for name, manifest in upstream.items()},
        "code_version": code_version(*sorted({module for stage in STAGES.values() for module in stage.code})),
        "libraries": library_versions(MODEL_LIBRARIES),
        "loraflow_version": _package_version(),
        "git_commit": _git_commit(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def render(
    cfg: RunConfig, kind: str, lineage: dict[str, Any], verification: dict[str, Any], metrics: dict[str, Any],
    formats: dict[str, dict[str, Any]] | None = None,
) -> str:
    """README.md of an exported model: what it is, how to load it, lineage, verification, inference
    formats, metrics, config."""
    # The settings the model depends on; the data's are summed up by its digest in the lineage, so an
    # edit that leaves the data unchanged (a contract's description) leaves the card unchanged too.
    settings = {stage: stage_settings(cfg, stage) for stage in ("train", "eval", "export")}
    front_matter = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"), "tags: [loraflow, lora]"]
    if lineage["base_model"]["hub_id"]:  # the hub links it; a local path would not resolve there
        front_matter.append(f"base_model: {lineage['base_model']['hub_id']}")
    front_matter.append("---")
    if kind == "adapter":
        what = f"LoRA adapter (PEFT format) for `{cfg.base_model}`, trained with {lineage['adapter']} by loraflow."
        usage = "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_DIR), or vLLM --lora-modules NAME=THIS_DIR"
    else:
        into = "the de-quantized nf4 base weights it was trained on" if lineage["adapter"] == "qlora" else "the base weights"
        what = (
            f"`{cfg.base_model}` fine-tuned with {lineage['adapter']}, the adapter merged into {into} "
            f"({cfg.export.merge_dtype}) by loraflow."
        )
        usage = "AutoModelForCausalLM.from_pretrained(THIS_DIR), or `transformers serve THIS_DIR`"
    return (
        "\n".join(front_matter) + f"\n\n# {cfg.name}\n\n{what}\n\nLoad: {usage}.\n\n"
        + _revision_line(lineage["base_model"])
        + "## Lineage\n\n```json\n" + json.dumps(lineage, indent=2) + "\n```\n\n"
        "## Verification\n\n"
        f"Compared with the {verification['reference']} on {verification['prompts']} val prompts: max logit difference "
        f"{verification['max_logit_diff']:.3g} (tolerance {verification['tolerance']:.3g}), greedy generations of "
        f"{verification['max_new_tokens']} tokens identical on {verification['generations_match']} of {verification['prompts']}.\n\n"
        + "".join(f"Note: {note}\n\n" for note in verification.get("notes", []))
        + _formats_section(formats or {})
        + "## Eval metrics\n\n```json\n" + json.dumps(metrics, indent=2) + "\n```\n\n"
        "## Config\n\n```json\n" + json.dumps(settings, indent=2) + "\n```\n"
    )


def _formats_section(formats: dict[str, dict[str, Any]]) -> str:
    """One row per `export.quantize` format: where it is (relative to the export directory), what
    loads it, how closely it answers like this model, and its size against this model's weights."""
    if not formats:
        return ""
    rows = ["## Inference formats\n", "Each was reloaded from its files and run greedily on the verify prompts above.\n",
            "| format | files | answers as this model | max logit diff | size vs this model | loads in | written by |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in formats.items():
        if record["status"] != "written":
            rows.append(f"| {name} | not written | | | | | {record['reason']} |")
            continue
        rows.append(
            f"| {name} | `../{record['path']}` | {record['answers_agree']} of {record['prompts']} ({record['agreement']:.0%}) | "
            f"{record['max_logit_diff']:.3g} | {record['size_ratio']:.2f}x | {record['loads_in']} | {record['tool']} |"
        )
    return "\n".join(rows) + "\n\n"


def _package_version() -> str | None:
    try:
        return metadata.version("loraflow")
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(TASKS_DIR.parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _revision_line(base: dict[str, Any]) -> str:
    if not base["hub_id"]:
        return ""
    return f"Base model: `{base['hub_id']}` at revision `{base['revision']}`.\n\n"
