"""A real OpenAI-compatible chat server on 127.0.0.1 for eval tests and the eval benchmark.

It answers `POST /v1/chat/completions` with a deterministic answer computed from the request by a
`responder(model, messages) -> str`, counts every request and every completed answer per prompt,
and injects faults on demand: a chosen fraction of prompts get, on their first
`Faults.failing_attempts` requests, a 429 with `Retry-After`, a 500, a response stalled past the
client's timeout (then sent anyway, as a slow server would), or a connection dropped without an
answer. Which prompt gets which fault is decided by a hash of the prompt, so it is the same in
every run.

In a test: `with FaultServer(...) as server: server.base_url`. As a process (for the readiness and
shutdown tests of `tasks.serving`): `python -m tests.eval_fault_server --port P`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Messages = list[dict[str, str]]
Responder = Callable[[str, Messages], str]


def last_word_responder(model: str, messages: Messages) -> str:
    """The last word of the last user message; a model whose name starts with `base` answers
    `unsure`. Test items put the reference label last, so the "tuned" model is always right."""
    if model.startswith("base"):
        return "unsure"
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    return user_turns[-1].split()[-1] if user_turns else ""


@dataclass
class Faults:
    rate_limit: float = 0.0  # fraction of prompts answered 429 + Retry-After
    server_error: float = 0.0  # ... 500
    stall: float = 0.0  # ... a response held back for `stall_s`
    drop: float = 0.0  # ... a connection closed without a response
    failing_attempts: int = 1  # requests of a chosen prompt that fail before one succeeds
    retry_after_s: float = 0.05
    stall_s: float = 1.5

    def kind_for(self, prompt_key: str) -> str | None:
        position = int(prompt_key[:8], 16) / 0x100000000
        bands = (("rate_limit", self.rate_limit), ("server_error", self.server_error), ("stall", self.stall), ("drop", self.drop))
        for kind, fraction in bands:
            if position < fraction:
                return kind
            position -= fraction
        return None


def prompt_key(model: str, messages: Messages) -> str:
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()


class FaultServer:
    def __init__(
        self, responder: Responder = last_word_responder, faults: Faults | None = None, api_keys: set[str] | None = None,
        delay_s: float = 0.0, port: int = 0,
    ) -> None:
        self.responder = responder
        self.faults = faults or Faults()
        self.api_keys = api_keys  # None: any key is accepted
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0  # most answers being produced at once
        self.requests: Counter[str] = Counter()  # every request that reached us, per prompt
        self.completed: Counter[str] = Counter()  # answers sent in full, per prompt
        self.faults_sent: Counter[str] = Counter()  # per fault kind
        self.authorizations: set[str] = set()  # Authorization headers seen
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests_for(self, model: str, messages: Messages) -> int:
        with self.lock:
            return self.requests[prompt_key(model, messages)]

    def total_requests(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.completed.clear()
            self.faults_sent.clear()
            self.max_in_flight = 0

    def start(self) -> FaultServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet: tests read counters, not access logs

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path == "/health":
                self._send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": []})
            elif self.path == "/stats":
                with server.lock:
                    self._send_json(200, {"requests": sum(server.requests.values()), "completed": sum(server.completed.values())})
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                return
            authorization = self.headers.get("Authorization", "")
            if server.api_keys is not None and authorization.removeprefix("Bearer ") not in server.api_keys:
                # Echoes the key, as some providers do: callers must not pass it on.
                message = f"invalid api key {authorization.removeprefix('Bearer ')}"
                self._send_json(401, {"error": {"message": message, "type": "invalid_request_error"}})
                return
            model, messages = body["model"], body["messages"]
            key = prompt_key(model, messages)
            with server.lock:
                server.authorizations.add(authorization)
                server.requests[key] += 1
                attempt = server.requests[key]
            fault = server.faults.kind_for(key) if attempt <= server.faults.failing_attempts else None
            if fault is not None:
                with server.lock:
                    server.faults_sent[fault] += 1
            if fault == "rate_limit":
                self._send_json(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(server.faults.retry_after_s)})
                return
            if fault == "server_error":
                self._send_json(500, {"error": {"message": "internal error"}})
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            time.sleep(server.faults.stall_s if fault == "stall" else server.delay_s)
            with server.lock:
                server.in_flight -= 1
            words = server.responder(model, messages).split()
            answer = " ".join(words[: body.get("max_tokens") or len(words)])
            prompt_words, answer_words = sum(len(m["content"].split()) for m in messages), len(answer.split())
            payload = {
                "id": f"chatcmpl-{key[:12]}-{attempt}", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_words, "completion_tokens": answer_words, "total_tokens": prompt_words + answer_words},
            }
            try:
                self._send_json(200, payload)
            except OSError:
                return  # the client gave up on a stalled answer
            with server.lock:
                server.completed[key] += 1

        def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0, help="Seconds to wait before listening.")
    arguments = parser.parse_args()
    print(f"fault server starting on port {arguments.port}", flush=True)
    time.sleep(arguments.startup_delay)
    server = FaultServer(port=arguments.port)
    print("fault server listening", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
