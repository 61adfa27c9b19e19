"""One base for every error loraflow raises on purpose, grouped in families a caller can act on.

The CLI maps each family to its exit code, so a script or a scheduler can tell "fix the config"
from "fix the data" from "the stage failed, re-run it" without parsing messages. Every subclass
keeps the builtin base it had (ValueError for bad input, RuntimeError for failures), so
`except ValueError` in callers still works.
"""

from __future__ import annotations


class LoraflowError(Exception):
    """Something loraflow can explain: the message names the file, the setting and the fix."""

    exit_code = 1
    # Whether a stage's configured retries may try again (tasks/stage.py `retry_unless_final`): a bad
    # config, bad data, a full disk or a spent budget fail the same way every time.
    retryable = True


class ConfigFamilyError(LoraflowError, ValueError):
    """The run config (or a file it names) cannot run as written. Exit code 2."""

    exit_code = 2
    retryable = False


class DataFamilyError(LoraflowError, ValueError):
    """The input data breaks its contract or cannot be read. Exit code 3."""

    exit_code = 3
    retryable = False


class StageFailedError(LoraflowError, RuntimeError):
    """A stage started and failed; a re-run resumes or retries it. Exit code 1."""

    exit_code = 1


class ServiceError(LoraflowError, RuntimeError):
    """A service the run depends on (model server, eval endpoint, hub, registry) is unavailable or
    refused the request. Exit code 4."""

    exit_code = 4
