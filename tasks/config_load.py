"""Reading a run config: YAML with Axolotl's semantics (tasks/axolotl_keys.py), validated into
`RunConfig`, with every problem reported at once and each unknown key named as the file writes it
(a did-you-mean only for real typos)."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from tasks.axolotl_keys import documented_keys, translate
from tasks.config import ConfigError, DatasetConfig, RunConfig


@dataclass
class ConfigReport:
    """What reading a config found: the config (None when it cannot be built), its problems and the
    notes on Axolotl keys. `partial` marks a config built after leaving out the keys in error, so
    that `loraflow validate` can still run the preflight checks on the rest."""

    path: Path
    cfg: RunConfig | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partial: bool = False

    def error_message(self) -> str:
        return "\n".join([f"{self.path}: {len(self.problems)} problem(s) in the config", *(f"  - {p}" for p in self.problems)])


def load_config(path: str | Path) -> RunConfig:
    """Reads and validates a YAML config; every problem is reported at once, as a ConfigError.
    Notes on Axolotl keys that change nothing here are in `cfg.notes`."""
    report = check_config(path)
    if report.problems:
        raise ConfigError(report.error_message())
    assert report.cfg is not None
    return report.cfg


def check_config(path: str | Path) -> ConfigReport:
    """Reads a YAML config with Axolotl's semantics (tasks/axolotl_keys.py) and validates it. A file
    that cannot be read at all raises ConfigError; problems in its settings are returned."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw.setdefault("name", path.stem)
    translation = translate(raw, _gpu_capabilities, frozenset(RunConfig.model_fields), frozenset(DatasetConfig.model_fields))
    report = ConfigReport(path, None, list(translation.problems), list(translation.notes))
    settings = translation.raw
    for attempt in range(4):
        try:
            cfg = RunConfig.model_validate(settings)
        except ValidationError as error:
            if attempt == 0:
                report.problems.extend(describe_validation_errors(error, translation.renamed))
            # Leave out what is in error and try again, so the remaining settings can still be checked.
            settings = _without_error_locations(settings, error)
            if settings is None:
                return report
            report.partial = True
            continue
        cfg._notes = report.notes
        cfg._precision_auto = translation.precision_auto
        report.cfg = cfg
        return report
    return report


def _gpu_capabilities() -> list[float]:
    from tasks.gpus import visible_gpus

    return [gpu.compute_capability for gpu in visible_gpus()]


def _without_error_locations(settings: dict[str, Any], error: ValidationError) -> dict[str, Any] | None:
    """A copy of `settings` without the keys the errors point at; None when an error has no key
    to drop (a required key missing, a rule across several keys)."""
    import copy

    trimmed = copy.deepcopy(settings)
    for problem in error.errors():
        location = problem["loc"]
        if not location or problem["type"] == "missing":
            return None
        node: Any = trimmed
        for part in location[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        if isinstance(node, dict) and location[-1] in node:
            del node[location[-1]]
        else:
            return None
    return trimmed


def format_validation_error(path: Path, error: ValidationError, other_problems: list[str] = ()) -> str:
    problems = [*(p.removeprefix("  - ") for p in other_problems), *describe_validation_errors(error)]
    return ConfigReport(path, None, problems).error_message()


def describe_validation_errors(error: ValidationError, renamed: dict[str, str] | None = None) -> list[str]:
    """One line per error, naming the key as the file writes it."""
    renamed = renamed or {}
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            written = renamed.get(location)
            named = f"`{written}` (read as `{location}`)" if written else f"`{location}`"
            lines.append(f"unknown key {named}{_did_you_mean(problem['loc'])}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
            lines.append(f"`{renamed.get(location, location)}`: {message}{shown}" if location else message)
    return lines


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """A suggestion only for a real typo: a known key at most one edit away (two for long names,
    a swap of neighbours counting as one). Keys of another meaning that merely look alike never
    reach here: every key Axolotl documents is known (tasks/axolotl_keys.py)."""
    known = _fields_of_parent(location)
    if len(location) == 1:
        known |= documented_keys()
    typo = str(location[-1])
    allowed = 1 if len(typo) < 10 else 2
    distance, closest = min(((_edit_distance(typo, name), name) for name in known), default=(allowed + 1, ""))
    if distance <= allowed:
        return f": did you mean `{closest}`?"
    # A name cut short (`api_key` for `api_key_env`): the keys it begins are what was meant.
    extended = sorted(name for name in _fields_of_parent(location) if len(typo) >= 4 and name.startswith(typo))
    if 1 <= len(extended) <= 2:
        return ": did you mean " + " or ".join(f"`{name}`" for name in extended) + "?"
    fields = sorted(_fields_of_parent(location))
    return f"; known keys here: {', '.join(fields)}" if len(fields) <= 12 else ""


def _edit_distance(left: str, right: str) -> int:
    """Levenshtein distance with adjacent swaps counted as one edit (optimal string alignment)."""
    if abs(len(left) - len(right)) > 2:
        return 3
    previous_row: list[int] = []
    row = list(range(len(right) + 1))
    for i, left_char in enumerate(left, start=1):
        before, previous_row, row = previous_row, row, [i] + [0] * len(right)
        for j, right_char in enumerate(right, start=1):
            cost = left_char != right_char
            row[j] = min(previous_row[j] + 1, row[j - 1] + 1, previous_row[j - 1] + cost)
            if i > 1 and j > 1 and left_char == right[j - 2] and left[i - 2] == right_char:
                row[j] = min(row[j], before[j - 2] + 1)
    return row[-1]


def _fields_of_parent(location: tuple[Any, ...]) -> set[str]:
    """Field names of the model that holds the key at `location` (walking nested sections)."""
    model: type[BaseModel] = RunConfig
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        nested = _model_in(field.annotation) if field else None
        if nested is None:
            return set()
        model = nested
    return set(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, Union, types.UnionType):
        for argument in typing.get_args(annotation):
            found = _model_in(argument)
            if found is not None:
                return found
    return None
