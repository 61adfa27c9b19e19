"""Models named by hub id or by local directory, resolved once to files on disk and to an identity.

Real configs say `base_model: meta-llama/Meta-Llama-3-8B-Instruct`. Such an id is resolved with
`huggingface_hub.snapshot_download`: the local cache (`$HF_HOME/hub/models--ORG--NAME/`) first, a
download where a hub is reachable, nothing but the cache under `HF_HUB_OFFLINE=1`. Every stage
then loads the resolved snapshot directory, so the revision that keys a stage is the revision it
loaded.

A model's *identity* stands for its content in stage keys: for a hub snapshot its commit hash
(re-hashing many GB of weights every night would cost minutes and says nothing more), for a local
directory the hash of its files.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.config import RunConfig
from tasks.errors import ConfigFamilyError
from tasks.fingerprint import FileHasher

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelNotFoundError(ConfigFamilyError):
    """A model (or tokenizer, or adapter) is neither a local directory nor a resolvable hub id."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are, and what they are."""

    reference: str  # as the config wrote it
    path: Path
    hub_id: str | None = None
    commit: str | None = None  # for hub snapshots: the resolved commit hash

    def identity(self, hasher: FileHasher) -> dict[str, str]:
        if self.commit is not None:
            return {"hub_id": str(self.hub_id), "commit": self.commit}
        return {"sha256": hasher.tree(self.path)}

    def lineage(self) -> dict[str, str | None]:
        return {"reference": self.reference, "hub_id": self.hub_id, "revision": self.commit}


# A name ending like a data file is a local path that is missing, never a hub id.
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".gz", ".zst", ".txt", ".yaml", ".yml")


def is_hub_id(reference: str) -> bool:
    """`org/name` that is not an existing local path (nor a missing data file's path)."""
    return (
        bool(_HUB_ID.match(reference)) and not reference.lower().endswith(_FILE_SUFFIXES)
        and not Path(reference).expanduser().exists()
    )


def resolve(reference: str, revision: str | None = None, what: str = "base_model", repo_type: str = "model") -> ResolvedModel:
    """The files of a model (or, with `repo_type="dataset"`, a dataset) given by local directory or
    hub id (+ revision); see the module doc."""
    local = Path(reference).expanduser()
    if local.is_dir():
        return ResolvedModel(reference, local)
    if not is_hub_id(reference):
        raise ModelNotFoundError(
            f"`{what}: {reference}` is neither a local directory nor a hub id (`org/name`); point it at a model directory "
            "in Hugging Face format or a hub model id"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache_dir = hub_cache_dir()
    # What the cache's ref points at is part of the memo: a moved `refs/main` is seen at once.
    ref_file = cache_dir / f"{repo_type}s--{reference.replace('/', '--')}" / "refs" / (revision or "main")
    pointed_at = ref_file.read_text().strip() if ref_file.is_file() else ""
    return _resolve_hub(reference, revision, what, repo_type, offline, str(cache_dir), pointed_at)


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (huggingface_hub fixes it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


@functools.lru_cache(maxsize=64)
def _resolve_hub(
    hub_id: str, revision: str | None, what: str, repo_type: str, offline: bool, cache_dir: str, pointed_at: str
) -> ResolvedModel:
    """Memoised per process, offline mode, cache and cached ref: a run resolves each id once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(snapshot_download(hub_id, revision=revision, repo_type=repo_type, cache_dir=cache_dir, local_files_only=offline))
    except (LocalEntryNotFoundError, FileNotFoundError) as error:
        raise ModelNotFoundError(
            f"`{what}: {hub_id}`{f' (revision {revision})' if revision else ''}: no local directory of that name here, "
            "and as a hub id it is not in the local hub cache "
            f"({cache_dir})"
            + (" and HF_HUB_OFFLINE=1 forbids a download; download it on a machine with access "
               f"(`hf download {hub_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`) into that cache, "
               "or unset HF_HUB_OFFLINE" if offline else
               " and the hub could not be reached; check the network or download it into the cache")
            + f" ({type(error).__name__})"
            + ("; or point it at a local model directory (`loraflow tiny-model DIR` builds a small one)" if repo_type == "model" else "")
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelNotFoundError(
            f"`{what}: {hub_id}`: {type(error).__name__}; check the id and revision, and HF_TOKEN for gated models"
        ) from None
    except HfHubHTTPError as error:
        raise ModelNotFoundError(f"`{what}: {hub_id}`: the hub answered {error}") from None
    commit = path.name if _COMMIT.match(path.name) else None
    return ResolvedModel(hub_id, path, hub_id, commit)


def base_model(cfg: RunConfig) -> ResolvedModel:
    """The run's base model, resolved (see `resolve`)."""
    return resolve(cfg.base_model, cfg.revision_of_model)


def base_model_dir(cfg: RunConfig) -> str:
    """The base model's local directory, for `from_pretrained`."""
    return str(base_model(cfg).path)
