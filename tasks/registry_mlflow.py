"""`export.registry: mlflow`: versions in the MLflow model registry instead of a folder.

One registered model per config (named after it). Each export is a model version whose source is
the model the pipeline's MLflow run logged (`tasks/tracking.py`); version N is shown as vNNNN, as
in the local registry. Aliases: `production` (what serves) and `previous` (what it replaced). The
version's tags carry what the gate and `loraflow models` read: `loraflow.fingerprint`,
`loraflow.record`, `loraflow.metrics` and, once decided, `loraflow.decision`; `loraflow.promoted_over`
names the version production replaced when this one was promoted, which `rollback` walks back.

The gate is the same as the local registry's (`tasks.registry.register_and_gate`). What MLflow
cannot hold stays in a local cache (`export.registry_dir`, default as for the local registry): the
writer lock, the gate's per-item scores of each version, and a version's model downloaded when
production must be re-scored on new items. The lock serialises writers on one machine; MLflow's
alias moves are single calls, so a reader never sees a half-moved pointer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.config import RunConfig
from tasks.registry import MODEL, RegistryError, Version, locked, normalise_version, registry_dir

log = logging.getLogger("loraflow.registry")

PRODUCTION_ALIAS = "production"
PREVIOUS_ALIAS = "previous"
TAG = "loraflow."


class MlflowRegistry:
    """The `RegistryBackend` on MLflow's model registry (MLFLOW_TRACKING_URI)."""

    def __init__(self, cfg: RunConfig, model_uri: str | None = None) -> None:
        import os

        from mlflow.tracking import MlflowClient

        os.environ.update(cfg.tracking_env)  # `mlflow_tracking_uri` in the config
        self.client = MlflowClient()
        self.name = cfg.name
        self.model_uri = model_uri
        self.cache = registry_dir(cfg) / "mlflow"
        self.location = f"mlflow:{self.name} at {self.client._registry_uri}"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.cache)

    def _model_versions(self) -> list[Any]:
        return sorted(self.client.search_model_versions(f"name='{self.name}'"), key=lambda mv: int(mv.version))

    def _as_version(self, model_version: Any) -> Version:
        tags = model_version.tags
        name = normalise_version(str(model_version.version))
        return Version(
            name=name, path=self.cache / name,
            record=json.loads(tags.get(f"{TAG}record", "{}")), metrics=json.loads(tags.get(f"{TAG}metrics", "{}")),
            decision=json.loads(tags[f"{TAG}decision"]) if f"{TAG}decision" in tags else None,
        )

    def versions(self) -> list[Version]:
        return [self._as_version(mv) for mv in self._model_versions()]

    def version(self, name: str) -> Version:
        number = str(int(normalise_version(name)[1:]))
        try:
            return self._as_version(self.client.get_model_version(self.name, number))
        except Exception as error:
            raise RegistryError(f"no version {name} of `{self.name}` in MLflow's registry; `loraflow models` lists them") from error

    def production(self) -> str | None:
        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except Exception:  # no registered model yet
            return None
        return normalise_version(str(aliases[PRODUCTION_ALIAS])) if PRODUCTION_ALIAS in aliases else None

    def add(self, export_dir: Path, manifest: dict[str, Any]) -> tuple[Version, bool]:
        """The export as a new model version, or the version it already is (same fingerprint)."""
        for model_version in self._model_versions():
            if model_version.tags.get(f"{TAG}fingerprint") == manifest["fingerprint"]:
                return self._as_version(model_version), False
        if self.model_uri is None:
            raise RegistryError("export.registry: mlflow registers the model the pipeline's MLflow run logged, and this run "
                                "logged none: see the tracking warning above (MLFLOW_TRACKING_URI)")
        import mlflow

        with contextlib.suppress(Exception):  # exists already
            self.client.create_registered_model(self.name, description=f"loraflow exports of the config `{self.name}`")
        record = {
            "fingerprint": manifest["fingerprint"], "kind": manifest.get("kind", "merged"), "merge_dtype": manifest.get("merge_dtype"),
            "lineage": manifest.get("lineage", {}), "export_dir": str(export_dir.resolve()), "model_uri": self.model_uri,
            "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        model_version = mlflow.register_model(self.model_uri, self.name, tags={
            f"{TAG}fingerprint": manifest["fingerprint"], f"{TAG}record": json.dumps(record),
            f"{TAG}metrics": json.dumps(manifest.get("metrics", {})),
        })
        version = self._as_version(self.client.get_model_version(self.name, model_version.version))
        log.info("registry: registered %s as %s in MLflow's registry", self.name, version.name)
        return version, True

    def record_decision(self, version: Version, decision: dict[str, Any]) -> None:
        self.client.set_model_version_tag(self.name, str(int(version.name[1:])), f"{TAG}decision", json.dumps(decision))

    def move_production(self, name: str, event: str, reason: str) -> None:
        """`promoted`: production -> name, previous -> the old production (recorded on the version).
        `rollback`: production -> name, previous -> what name had replaced, so rollbacks walk back."""
        number = str(int(name[1:]))
        current = self.production()
        replaced = current if event == "promoted" else self.promoted_over(name)
        if event == "promoted":
            self.client.set_model_version_tag(self.name, number, f"{TAG}promoted_over", current or "")
        self.client.set_registered_model_alias(self.name, PRODUCTION_ALIAS, number)
        if replaced:
            self.client.set_registered_model_alias(self.name, PREVIOUS_ALIAS, str(int(replaced[1:])))
        else:
            with contextlib.suppress(Exception):
                self.client.delete_registered_model_alias(self.name, PREVIOUS_ALIAS)
        log.info("registry: production of %s is now %s (%s)", self.name, name, reason)

    def promoted_over(self, name: str) -> str | None:
        number = str(int(normalise_version(name)[1:]))
        return self.client.get_model_version(self.name, number).tags.get(f"{TAG}promoted_over") or None

    def fetch_model(self, version: Version) -> None:
        """Downloads the version's model into the local cache, for serving it to the gate or a hub push."""
        target = version.path / MODEL
        if target.is_dir():
            return
        import mlflow

        staging = version.path / ".download"
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{self.name}/{int(version.name[1:])}", dst_path=str(staging)))
        # The pyfunc keeps the export under artifacts/model/; an adapter version is a plain folder.
        source = downloaded / "artifacts" / "model" if (downloaded / "artifacts" / "model").is_dir() else downloaded
        source.rename(target)
