"""Asking an OpenAI-compatible endpoint for answers: bounded concurrency, retries, and a response
cache on disk so that a re-run, or a run resumed after a crash, pays only for what is missing.

What you can rely on:
- At most `eval.concurrency` requests are in flight; each attempt times out after
  `eval.request_timeout` seconds.
- 429, 5xx, timeouts and dropped connections are retried up to `eval.max_retries` times with
  exponential backoff and jitter (0.5 s doubling to 8 s), honouring `Retry-After` up to 2 minutes.
  These are the `openai` client's own retries (checked against a faulty server in
  tests/test_eval_faults.py); other errors (401, 404, 400) fail at once.
- Each answer is appended to the cache, and flushed to disk, the moment it arrives. The cache is
  keyed by the model's fingerprint, the prompt and the sampling parameters; a prompt is asked at
  most once per run even if it appears twice, and an answer is recorded once even if a retried
  request reached the server twice.
- When requests fail for good, every answer that did arrive stays cached and `EvalRequestError`
  says how many are missing and what to change. API keys never appear in messages.
- Under `spending_limit(budget)` (eval's `eval.budget_usd`), a request is not sent when what was
  spent, plus what the requests in flight and this one are expected to cost (the dearest request
  of that model so far), would pass the budget; `BudgetExceededError` then says what was spent.
  Before the first answer of a model its price is unknown, so up to `eval.concurrency` first
  requests can pass the budget by their own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import EvalConfig
from tasks.errors import ConfigFamilyError, ServiceError, StageFailedError
from tasks.fingerprint import hash_json

log = logging.getLogger("loraflow.eval")

Messages = list[dict[str, str]]
NO_KEY = "none"  # the client insists on a key; servers without auth ignore it


class EvalRequestError(ServiceError):
    """Requests to an eval endpoint failed after every retry; the answers that arrived are cached."""


class ApiKeyError(ConfigFamilyError):
    """The API key named in the config cannot be found."""


class BudgetExceededError(StageFailedError):
    """Eval stopped asking because `eval.budget_usd` would be passed; the answers that arrived are
    cached, so a re-run with a larger budget pays only for the rest. Never retried: a retry would
    spend again."""

    retryable = False


@dataclass
class SpendingLimit:
    """One ledger for every request of an eval run (tuned, base, judge, test set)."""

    budget_usd: float
    prices: dict[str, Any]
    spent_usd: float = 0.0
    requests: int = 0
    refused: int = 0
    reserved_usd: float = 0.0
    dearest: dict[str, float] = field(default_factory=dict)  # by model fingerprint

    def reserve(self, target: ModelTarget) -> float:
        expected = self.dearest.get(target.fingerprint, 0.0)
        if self.spent_usd + self.reserved_usd + expected > self.budget_usd + 1e-12:
            self.refused += 1
            raise BudgetExceededError(target.role)
        self.reserved_usd += expected
        return expected

    def charge(self, target: ModelTarget, answer: Answer, reserved: float) -> None:
        from tasks.eval_metrics import cost_usd

        cost = cost_usd(self.prices, target.price_names(), answer.prompt_tokens, answer.completion_tokens)
        self.reserved_usd -= reserved
        self.spent_usd += cost
        self.requests += 1
        self.dearest[target.fingerprint] = max(self.dearest.get(target.fingerprint, 0.0), cost)

    def error(self) -> BudgetExceededError:
        return BudgetExceededError(
            f"eval.budget_usd={self.budget_usd:g} reached: {self.spent_usd:.6f} USD spent on {self.requests} requests in this "
            f"run, {self.refused} more not sent. The answers that arrived are cached: raise eval.budget_usd (or lower "
            "eval.max_samples) and run again to pay only for the rest."
        )


_SPENDING: contextvars.ContextVar[SpendingLimit | None] = contextvars.ContextVar("loraflow_eval_spending", default=None)


@contextlib.contextmanager
def spending_limit(budget_usd: float | None, prices: dict[str, Any]) -> Iterator[SpendingLimit | None]:
    """Every `ask_all` inside shares one ledger: a context rather than an argument, so the judge
    and every other caller of `ask_all` are covered without threading it through each call."""
    ledger = SpendingLimit(budget_usd, prices) if budget_usd is not None else None
    token = _SPENDING.set(ledger)
    try:
        yield ledger
    finally:
        _SPENDING.reset(token)


@dataclass(frozen=True)
class ModelTarget:
    """One model behind one endpoint. `fingerprint` is what its answers depend on (the model's
    content, or the endpoint and model name when the weights are not ours); it keys the cache.
    `base_url` None means the endpoint was not started because every answer is cached."""

    role: str  # "tuned", "base" or "judge"
    model: str  # the name requested from the endpoint
    fingerprint: str
    base_url: str | None = None
    api_key: str = field(default=NO_KEY, repr=False)

    def price_names(self) -> tuple[str, str]:
        return self.model, self.role


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # of the request that answered (retries and backoff not included)
    cached: bool = False
    retries: int = 0


class ResponseCache:
    """Append-only JSONL of one model's answers, one line per answer.

    A kill can only leave the last line torn; it is cut off when the cache is opened again, so the
    next append starts on a fresh line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            content = path.read_bytes()
            complete = content[: content.rfind(b"\n") + 1]
            if len(complete) != len(content):
                with path.open("r+b") as handle:
                    handle.truncate(len(complete))
            for line in complete.decode("utf-8").splitlines():
                entry = json.loads(line)
                self.entries[entry["key"]] = entry["answer"]
        self._handle = path.open("a", encoding="utf-8")

    @staticmethod
    def key(target: ModelTarget, messages: Messages, parameters: dict[str, Any]) -> str:
        return hash_json({"model": target.fingerprint, "messages": messages, "parameters": parameters})

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> Answer | None:
        entry = self.entries.get(key)
        return Answer(**entry, cached=True) if entry is not None else None

    def put(self, key: str, answer: Answer) -> None:
        record = {k: v for k, v in asdict(answer).items() if k not in ("cached", "retries")}
        if key in self.entries:
            return
        self.entries[key] = record
        self._handle.write(json.dumps({"key": key, "answer": record}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def cache_path(cache_dir: Path, target: ModelTarget) -> Path:
    return cache_dir / f"{target.role}-{hash_json(target.fingerprint)[:24]}.jsonl"


def count_missing(target: ModelTarget, prompts: Sequence[Messages], parameters: dict[str, Any], cache_dir: Path) -> int:
    """How many distinct prompts have no cached answer (0: the endpoint need not be started)."""
    cache = ResponseCache(cache_path(cache_dir, target))
    try:
        return len({key for key in (ResponseCache.key(target, m, parameters) for m in prompts) if key not in cache})
    finally:
        cache.close()


def ask_all(
    target: ModelTarget, prompts: Sequence[Messages], parameters: dict[str, Any], settings: EvalConfig, cache_dir: Path
) -> list[Answer]:
    """Answers for every prompt, in order; cached answers are reused without a request."""
    cache = ResponseCache(cache_path(cache_dir, target))
    ledger = _SPENDING.get()
    try:
        return _run_to_completion(_ask_all(target, prompts, parameters, settings, cache, ledger))
    finally:
        cache.close()


def _run_to_completion(coroutine: Any) -> Any:
    """asyncio.run, also from code that already runs inside an event loop (a flow run started by
    `prefect flow-run retry` does): then the coroutine gets a loop of its own in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, coroutine).result()


async def _ask_all(
    target: ModelTarget, prompts: Sequence[Messages], parameters: dict[str, Any], settings: EvalConfig, cache: ResponseCache,
    ledger: SpendingLimit | None = None,
) -> list[Answer]:
    keys = [ResponseCache.key(target, messages, parameters) for messages in prompts]
    to_ask = {key: messages for key, messages in zip(keys, prompts) if key not in cache}
    fresh: dict[str, Answer] = {}
    if to_ask:
        if target.base_url is None:
            raise EvalRequestError(f"{len(to_ask)} {target.role} answers are not cached and no endpoint was started for them")
        failures = await _request_missing(target, to_ask, parameters, settings, cache, fresh, ledger)
        if ledger is not None and any(isinstance(failure, BudgetExceededError) for failure in failures):
            raise ledger.error() from None
        if failures:
            import openai

            if not isinstance(failures[0], openai.OpenAIError):
                raise failures[0]
            raise EvalRequestError(_failure_message(target, settings, failures, len(to_ask))) from None
    retries = sum(answer.retries for answer in fresh.values())
    log.info(
        "eval %s: %d answers, %d requested (%d retries), %d from the cache",
        target.role, len(prompts), len(fresh), retries, len(prompts) - len(fresh),
    )
    # The first prompt with a key owns the fresh answer; repeats of it count as cached.
    answers, seen = [], set()
    for key in keys:
        answers.append(fresh[key] if key in fresh and key not in seen else cache.get(key))
        seen.add(key)
    return answers


async def _request_missing(
    target: ModelTarget, to_ask: dict[str, Messages], parameters: dict[str, Any], settings: EvalConfig,
    cache: ResponseCache, fresh: dict[str, Answer], ledger: SpendingLimit | None = None,
) -> list[BaseException]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=target.base_url, api_key=target.api_key, timeout=settings.request_timeout, max_retries=settings.max_retries
    )
    limit = asyncio.Semaphore(settings.concurrency)

    async def ask(key: str, messages: Messages) -> None:
        async with limit:
            reserved = ledger.reserve(target) if ledger is not None else 0.0
            try:
                raw = await client.chat.completions.with_raw_response.create(model=target.model, messages=messages, **parameters)
            except BaseException:
                if ledger is not None:
                    ledger.reserved_usd -= reserved
                raise
            response = raw.parse()
        usage = response.usage
        answer = Answer(
            text=response.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=raw.elapsed.total_seconds(),
            retries=raw.retries_taken,
        )
        if ledger is not None:
            ledger.charge(target, answer, reserved)
        cache.put(key, answer)
        fresh[key] = answer

    try:
        results = await asyncio.gather(*(ask(key, messages) for key, messages in to_ask.items()), return_exceptions=True)
    finally:
        await client.close()
    return [result for result in results if isinstance(result, BaseException)]


def _failure_message(target: ModelTarget, settings: EvalConfig, failures: list[BaseException], asked: int) -> str:
    import openai

    first = failures[0]
    hints = {
        openai.AuthenticationError: "the API key was refused: check the variable or Secret block named in the config",
        openai.PermissionDeniedError: "the API key may not use this model",
        openai.NotFoundError: f"the endpoint does not serve a model named {target.model!r}: check the model name",
        openai.RateLimitError: "still rate limited: lower eval.concurrency or raise eval.max_retries",
        openai.APITimeoutError: "requests timed out: raise eval.request_timeout or lower eval.concurrency",
        openai.APIConnectionError: f"cannot reach {target.base_url}: is the endpoint up?",
        openai.InternalServerError: "the endpoint kept failing (5xx): check its health, or raise eval.max_retries",
    }
    hint = next((text for kind, text in hints.items() if isinstance(first, kind)), "see the error above")
    detail = redact(f"{type(first).__name__}: {first}", target.api_key)
    return (
        f"{len(failures)} of {asked} requests for the {target.role} model {target.model!r} at {target.base_url} failed "
        f"after {settings.max_retries} retries ({detail}); {hint}. The {asked - len(failures)} answers that arrived are "
        "cached: running eval again asks only for the missing ones."
    )


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret and secret != NO_KEY else text


def resolve_api_key(env_name: str | None, secret_name: str | None, setting: str) -> str:
    """The API key from the environment variable or Prefect Secret block the config names; the
    config never holds the key itself."""
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            # A name that does not look like one may be a key pasted by mistake: not echoed.
            shown = env_name if re.fullmatch(r"[A-Z][A-Z0-9_]*", env_name) else "it names"
            raise ApiKeyError(
                f"`{setting}.api_key_env`: the environment variable {shown} is not set (or is empty); "
                "export it before the run, or name a Prefect Secret block with `api_key_secret`"
            )
        return value
    if secret_name:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(secret_name).get()
        except ValueError:
            raise ApiKeyError(
                f"`{setting}.api_key_secret`: no Prefect Secret block named {secret_name!r} on this Prefect server; "
                f"create it with `prefect block create secret` or `Secret(value=...).save({secret_name!r})`"
            ) from None
        if not isinstance(value, str) or not value:
            raise ApiKeyError(f"`{setting}.api_key_secret`: the Secret block {secret_name!r} must hold the key as a string")
        return value
    return NO_KEY
