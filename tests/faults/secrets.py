"""Canary secrets: values put in every secret setting, then searched for in every byte a run leaves
behind (state, outputs, registry, the Prefect database and result store, captured output)."""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

# Environment variable -> canary value. The values look like real keys and are unique enough that a
# hit can only be a leak.
CANARIES = {
    "LORAFLOW_FAULTS_EVAL_KEY": "sk-canaryEVAL-7d1f0c2b9a4e4b8c93f1d0e2a5b6c7d8",
    "LORAFLOW_FAULTS_JUDGE_KEY": "sk-canaryJUDGE-3e9a1b7c5d2f4a6b8c0d1e2f3a4b5c6d",
    "LORAFLOW_FAULTS_HUB_TOKEN": "hf_canaryHUBtoken9b8a7c6d5e4f3a2b1c0d9e8f7a6b",
}


def secret_settings(eval_url: str) -> dict:
    """Config overrides that name every canary: the eval key, the judge key, the hub token."""
    return {
        "eval": {
            "api_key_env": "LORAFLOW_FAULTS_EVAL_KEY",
            "judge": {"base_url": eval_url, "model": "judge", "api_key_env": "LORAFLOW_FAULTS_JUDGE_KEY"},
        },
        "export": {"hub_token_env": "LORAFLOW_FAULTS_HUB_TOKEN"},
        "hub_model_id": "loraflow-faults/canary-model",
    }


def canary_env() -> dict[str, str]:
    return {**CANARIES, "HF_TOKEN": CANARIES["LORAFLOW_FAULTS_HUB_TOKEN"]}


def _forms(value: str) -> list[bytes]:
    """The value as written, URL-quoted, base64 (as in a Basic auth header), and its first 20 characters."""
    return [value.encode(), urllib.parse.quote(value).encode(), base64.b64encode(value.encode()), value[:20].encode()]


@dataclass(frozen=True)
class Leak:
    variable: str
    path: Path


def find_leaks(roots: list[Path]) -> list[Leak]:
    """Every (canary, file) pair where a file under `roots` holds the canary in any of its forms."""
    leaks = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        for path in files:
            try:
                content = path.read_bytes()
            except OSError:
                continue
            leaks += [Leak(name, path) for name, value in CANARIES.items() if any(form in content for form in _forms(value))]
    return leaks
