"""A small OpenAI-compatible chat server for tests: answers the sentiment label that the user's
headline names (so answers are right, deterministic and checkable) and counts requests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LABEL_WORDS = {
    "positive": ("surge", "beats", "raises", "record", "rally", "jump", "soar", "upgrade", "gain", "climb"),
    "negative": ("plunge", "misses", "cuts", "bankruptcy", "recall", "slump", "tumble", "downgrade", "loss", "fall"),
}


def label_for(text: str) -> str:
    lowered = text.lower()
    for label, words in LABEL_WORDS.items():
        if any(word in lowered for word in words):
            return label
    return "neutral"


class StubServer:
    def __init__(self, port: int = 0) -> None:
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests += 1
                user_text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                payload = json.dumps({
                    "id": f"stub-{stub.requests}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": label_for(user_text)}}],
                    "usage": {"prompt_tokens": len(user_text.split()), "completion_tokens": 1,
                              "total_tokens": len(user_text.split()) + 1},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
