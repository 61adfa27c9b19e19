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
    return validate_frame_groups(contract, [frames], docs_dir)[0]


def validate_frame_groups(contract: Contract, groups: list[Iterable[Any]], docs_dir: Path | None = None) -> list[dict[str, Any]]:
    """One summary per group of frames, from one GX context (creating one costs about a second):
    prep validates the rows it has not validated before in groups it can reuse separately."""
    import great_expectations as gx
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    summaries = []
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
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN},
        ))
        for frames in groups:
            checks: dict[str, dict[str, Any]] = {}
            rows = 0
            for frame in frames:
                rows += len(frame)
                run = checkpoint.run(batch_parameters={"dataframe": frame})
                for result in run.run_results.values():
                    for item in result.results:
                        _merge_check(checks, item)
            summaries.append(_summary(contract, checks, rows))
        if docs_dir is not None:
            # Once for every run above (a site build costs about a second).
            context.build_data_docs()
            site = Path(project_dir) / "gx" / "uncommitted" / "data_docs" / "local_site"
            shutil.copytree(site, docs_dir)
    return summaries


def _summary(contract: Contract, checks: dict[str, dict[str, Any]], rows: int) -> dict[str, Any]:
    # In the contract's order, which is the order its author reads it in.
    order = [_check_id(item.type, item.kwargs) for item in contract.expectations]
    ordered = [checks[key] for key in order if key in checks]
    return {
        "contract": contract.name,
        "rows": rows,
        "passed": all(check["success"] or check["severity"] == "warn" for check in ordered),
        "checks": json.loads(json.dumps(ordered, default=str)),
    }


def needs_whole_column(expectation_type: str) -> bool:
    """Whether an expectation judges a column as a whole (uniqueness, mean, distinct values, row
    count, z-scores) rather than row by row: its result over parts cannot be combined into its
    result over the whole, so prep validates such a contract in one pass over every row."""
    row_by_row = expectation_type.startswith(ROW_LEVEL_PREFIXES) or expectation_type in ROW_LEVEL_TYPES
    return not row_by_row or ("unique" in expectation_type and expectation_type not in ROW_LEVEL_TYPES) or "z_score" in expectation_type


ROW_LEVEL_PREFIXES = ("expect_column_values_to_", "expect_column_value_lengths_to_", "expect_column_pair_values_",
                      "expect_multicolumn_values_")
ROW_LEVEL_TYPES = ("expect_select_column_values_to_be_unique_within_record",)


def merge_summaries(contract: Contract, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary over all rows, from summaries of row-level expectations over parts of them:
    counts add up; success is every part's, or, for an expectation with `mostly`, recomputed from
    the counts (unexpected among the non-missing values)."""
    merged: list[dict[str, Any]] = []
    for position, expectation in enumerate(contract.expectations):
        parts = [summary["checks"][position] for summary in summaries
                 if len(summary["checks"]) > position and summary["checks"][position]["expectation"] == expectation.type]
        if not parts:
            continue
        check = {**parts[0], "unexpected_count": sum(part["unexpected_count"] for part in parts),
                 "element_count": sum(part.get("element_count", 0) for part in parts),
                 "missing_count": sum(part.get("missing_count", 0) for part in parts),
                 "unexpected_examples": [example for part in parts for example in part["unexpected_examples"]][:EXAMPLES_SHOWN],
                 "exception": next((part["exception"] for part in parts if part["exception"]), None)}
        mostly = expectation.kwargs.get("mostly")
        if mostly is None or check["exception"]:
            check["success"] = all(part["success"] for part in parts)
        else:
            present = check["element_count"] - check["missing_count"]
            check["success"] = present == 0 or (present - check["unexpected_count"]) / present >= mostly
        merged.append(check)
    return {
        "contract": contract.name,
        "rows": sum(summary["rows"] for summary in summaries),
        "passed": all(check["success"] or check["severity"] == "warn" for check in merged),
        "checks": merged,
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
        "element_count": 0,
        "missing_count": 0,
        "unexpected_examples": [],
        "exception": None,
    })
    check["success"] = check["success"] and bool(item.success)
    check["unexpected_count"] += details.get("unexpected_count") or 0
    check["element_count"] += details.get("element_count") or 0
    check["missing_count"] += details.get("missing_count") or 0
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
