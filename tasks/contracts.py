"""Data contracts: YAML files that data engineers edit, validated with great-expectations.

A contract is a list of GX expectations, each with a severity. `error` failures stop prep before
anything is trained on the data; `warn` failures are reported and the run goes on. Keeping the
contract as plain YAML (not GX's own JSON suites) makes it reviewable in a pull request.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import DataFamilyError

EXAMPLES_SHOWN = 5


class ContractError(DataFamilyError):
    """A contract file that cannot be read, or data that breaks an `error` expectation."""


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="A great-expectations expectation type, e.g. expect_column_values_to_be_in_set.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    severity: Literal["error", "warn"] = "error"


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    expectations: list[Expectation] = Field(min_length=1)


def contract_path(contract_dir: Path, name: str) -> Path:
    return contract_dir / f"{name}.yaml"


def load_contract(contract_dir: Path, name: str) -> Contract:
    path = contract_path(contract_dir, name)
    if not path.is_file():
        available = sorted(p.stem for p in contract_dir.glob("*.yaml")) if contract_dir.is_dir() else []
        raise ContractError(
            f"contract `{name}` not found: no file {path}; contracts in {contract_dir}: "
            f"{', '.join(available) or 'none'}"
        )
    try:
        return Contract.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as error:
        raise ContractError(f"{path}: not a valid contract: {error}") from None


def validate_frame(contract: Contract, frame: Any, docs_dir: Path | None = None) -> dict[str, Any]:
    return validate_frames(contract, [frame], docs_dir)


def validate_frames(contract: Contract, frames: Iterable[Any], docs_dir: Path | None = None) -> dict[str, Any]:
    """Validates pandas DataFrames (chunks of one source) with great-expectations; returns one
    JSON-able summary: every expectation with its severity, success, unexpected count and a few
    unexpected values, which is what a data engineer needs to fix the data or the contract.

    Chunks keep memory flat on large sources; row-level expectations (the usual kind) mean the
    same per chunk as over the whole source. With `docs_dir`, GX Data Docs HTML is written there.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with tempfile.TemporaryDirectory(prefix="loraflow-gx-") as project_dir:
        context = gx.get_context(mode="file", project_root_dir=project_dir)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        suite = context.suites.add(ExpectationSuite(
            name=contract.name,
            expectations=[
                {"type": item.type, "kwargs": item.kwargs, "meta": {"severity": item.severity}}
                for item in contract.expectations
            ],
        ))
        batches = context.data_sources.add_pandas("loraflow").add_dataframe_asset("rows").add_batch_definition_whole_dataframe("chunk")
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=contract.name, data=batches, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=contract.name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")] if docs_dir else [],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN},
        ))
        checks: dict[str, dict[str, Any]] = {}
        rows = 0
        for frame in frames:
            rows += len(frame)
            run = checkpoint.run(batch_parameters={"dataframe": frame})
            for result in run.run_results.values():
                for item in result.results:
                    _merge_check(checks, item)
        if docs_dir is not None:
            site = Path(project_dir) / "gx" / "uncommitted" / "data_docs" / "local_site"
            shutil.copytree(site, docs_dir)
    # In the contract's order, which is the order its author reads it in.
    order = [_check_id(item.type, item.kwargs) for item in contract.expectations]
    ordered = [checks[key] for key in order if key in checks]
    return {
        "contract": contract.name,
        "rows": rows,
        "passed": all(check["success"] or check["severity"] == "warn" for check in ordered),
        "checks": json.loads(json.dumps(ordered, default=str)),
    }


def _check_id(expectation_type: str, kwargs: dict[str, Any]) -> str:
    """Identifies an expectation in GX's results, which come back in no fixed order and with
    numbers turned into floats."""
    def normalise(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, list, dict)):
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, list):
            return [normalise(item) for item in value]
        return {key: normalise(item) for key, item in value.items() if key != "batch_id"}

    return json.dumps([expectation_type, normalise(kwargs)], sort_keys=True, default=str)


def _exception_message(exception_info: Any) -> str | None:
    """GX reports exceptions either flat or keyed by the metric that raised them."""
    if not exception_info:
        return None
    if "exception_message" in exception_info:
        return exception_info["exception_message"]
    return next((info.get("exception_message") for info in exception_info.values() if isinstance(info, dict)), None)


def _merge_check(checks: dict[str, dict[str, Any]], item: Any) -> None:
    config = item.expectation_config
    details = item.result or {}
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    check = checks.setdefault(_check_id(config.type, kwargs), {
        "expectation": config.type,
        "column": config.kwargs.get("column"),
        "severity": config.meta.get("severity", "error"),
        "success": True,
        "unexpected_count": 0,
        "unexpected_examples": [],
        "exception": None,
    })
    check["success"] = check["success"] and bool(item.success)
    check["unexpected_count"] += details.get("unexpected_count") or 0
    room = EXAMPLES_SHOWN - len(check["unexpected_examples"])
    check["unexpected_examples"] += (details.get("partial_unexpected_list") or [])[:room]
    check["exception"] = check["exception"] or _exception_message(item.exception_info)


def describe_failures(summary: dict[str, Any], source: str) -> str:
    failed = [check for check in summary["checks"] if not check["success"]]
    lines = [f"data contract `{summary['contract']}` failed on {source} ({summary['rows']} rows):"]
    for check in failed:
        detail = check["exception"] or (
            f"{check['unexpected_count']} unexpected, e.g. {check['unexpected_examples']}"
        )
        lines.append(f"  - [{check['severity']}] {check['expectation']}({check['column']}): {detail}")
    lines.append(f"  fix the data, or edit data_contracts/{summary['contract']}.yaml if the contract is wrong")
    return "\n".join(lines)
