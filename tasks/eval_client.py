"""Asking an OpenAI-compatible endpoint for answers: bounded concurrency, retries, and a response
cache on disk so that a re-run, or a run resumed after a crash, pays only for what is missing.

Retries (exponential backoff with jitter on 429, 5xx, timeouts and lost connections, honouring
`Retry-After`) are the `openai` client's own; we set how many and how long to wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.fingerprint import hash_json


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool = False


class ResponseCache:
    """Append-only JSONL of answers for one model, keyed by prompt and sampling parameters.

    Each answer is flushed as soon as it arrives; a line cut short by a kill is ignored on read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                self.entries[entry["key"]] = entry["answer"]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")

    @staticmethod
    def key(messages: list[dict[str, str]], parameters: dict[str, Any]) -> str:
        return hash_json({"messages": messages, "parameters": parameters})

    def get(self, key: str) -> Answer | None:
        entry = self.entries.get(key)
        return Answer(**{**entry, "cached": True}) if entry is not None else None

    def put(self, key: str, answer: Answer) -> None:
        record = {k: v for k, v in asdict(answer).items() if k != "cached"}
        self.entries[key] = record
        self._handle.write(json.dumps({"key": key, "answer": record}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


async def _ask_all(
    base_url: str, model: str, api_key: str, prompts: list[list[dict[str, str]]], parameters: dict[str, Any],
    cache: ResponseCache, concurrency: int, timeout: float, max_retries: int,
) -> list[Answer]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    limit = asyncio.Semaphore(concurrency)

    async def ask(messages: list[dict[str, str]]) -> Answer:
        key = ResponseCache.key(messages, parameters)
        if (cached := cache.get(key)) is not None:
            return cached
        async with limit:
            started = time.perf_counter()
            response = await client.chat.completions.create(model=model, messages=messages, **parameters)
            usage = response.usage
            answer = Answer(
                text=response.choices[0].message.content or "",
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_s=time.perf_counter() - started,
            )
        cache.put(key, answer)
        return answer

    try:
        return await asyncio.gather(*(ask(messages) for messages in prompts))
    finally:
        await client.close()


def ask_all(
    base_url: str, model: str, api_key: str, prompts: list[list[dict[str, str]]], parameters: dict[str, Any],
    cache_path: Path, concurrency: int, timeout: float, max_retries: int,
) -> list[Answer]:
    """Answers for every prompt, in order; cached answers are reused without a request."""
    cache = ResponseCache(cache_path)
    try:
        return asyncio.run(_ask_all(base_url, model, api_key, prompts, parameters, cache, concurrency, timeout, max_retries))
    finally:
        cache.close()
