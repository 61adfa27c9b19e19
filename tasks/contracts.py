"""Data contracts: YAML files that data engineers edit, validated with great-expectations.

A contract is a list of GX expectations, each with a severity. `error` failures stop prep before
anything is trained on the data; `warn` failures are reported and the run goes on. Keeping the
contract as plain YAML (not GX's own JSON suites) makes it reviewable in a pull request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

EXAMPLES_SHOWN = 5


class ContractError(ValueError):
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


def validate_frame(contract: Contract, frame: Any) -> dict[str, Any]:
    """Validates a pandas DataFrame with great-expectations; returns a JSON-able summary.

    The summary lists every expectation with its severity, success, unexpected count and a few
    unexpected values, which is what a data engineer needs to fix the data or the contract.
    """
    import great_expectations as gx
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = ExpectationSuite(
        name=contract.name,
        expectations=[
            {"type": item.type, "kwargs": item.kwargs, "meta": {"severity": item.severity}}
            for item in contract.expectations
        ],
    )
    batch = (
        context.data_sources.add_pandas("loraflow")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN})
    checks = []
    for item in result.results:
        config = item.expectation_config
        details = item.result or {}
        checks.append({
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "severity": config.meta.get("severity", "error"),
            "success": bool(item.success),
            "unexpected_count": details.get("unexpected_count", 0),
            "unexpected_examples": details.get("partial_unexpected_list", [])[:EXAMPLES_SHOWN],
            "exception": (item.exception_info or {}).get("exception_message") or None,
        })
    return {
        "contract": contract.name,
        "rows": len(frame),
        "passed": all(check["success"] or check["severity"] == "warn" for check in checks),
        "checks": json.loads(json.dumps(checks, default=str)),
    }


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
