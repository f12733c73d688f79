"""A tiny OpenAI-compatible server on 127.0.0.1 that misbehaves on purpose, for fault-injection tests only.

Each incoming request takes the next action from a script: "429" (with Retry-After: 0), "500", "drop" (close
the connection without a reply), "slow" (answer after ``slow_seconds``), "malformed" (invalid JSON body), or a
string starting with "ok" (a valid chat completion; "ok:TEXT" sets the content). When the script runs out,
requests get ``default``. Real behaviour is tested against a real vLLM server; this only injects faults.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_completion(body: dict, content: str, prompt_tokens: int = 10, completion_tokens: int = 7) -> dict:
    """A valid OpenAI chat completion answering the request ``body`` with ``content``."""
    return {
        "id": "cmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "m"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class JsonServer:
    """A threaded HTTP server on 127.0.0.1 that hands every POST's JSON body to ``handle``; a context manager.
    Subclasses decide the reply (``send`` writes one)."""

    def __init__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.handle(self, body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default backlog (5) refuses connections when many arrive at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def send(
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout) before the answer came

    @staticmethod
    def drop(handler: BaseHTTPRequestHandler) -> None:
        """Close the connection without a reply."""
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultServer(JsonServer):
    def __init__(
        self,
        script: list[str],
        default: str = "ok",
        slow_seconds: float = 5.0,
        content="Step 1: 2 + 3 = 5\nThe final answer is \\boxed{5}.",
    ):
        """``content``: the reply text, or a function of the request body that returns it."""
        super().__init__()
        self.script = list(script)
        self.default = default
        self.slow_seconds = slow_seconds
        self.content = content
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        with self.lock:
            self.requests.append(
                {"path": handler.path, "body": body, "authorization": handler.headers.get("Authorization")}
            )
            action = self.script.pop(0) if self.script else self.default
        self.respond(handler, action, body)

    def completion(self, body: dict, content: str) -> dict:
        return chat_completion(body, content)

    def respond(self, handler: BaseHTTPRequestHandler, action: str, body: dict) -> None:
        if action == "drop":
            self.drop(handler)
            return
        if action == "slow":
            time.sleep(self.slow_seconds)
            action = "ok"
        status, headers, payload = 200, {}, b""
        if action == "429":
            status, headers = 429, {"Retry-After": "0"}
            payload = json.dumps({"error": {"message": "rate limited", "type": "rate_limit"}}).encode()
        elif action == "500":
            status, payload = 500, json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
        elif action == "malformed":
            payload = b'{"id": "x", "choices": [ this is not json'
        elif action.startswith("ok"):
            content = (
                action[3:]
                if action.startswith("ok:")
                else self.content(body)
                if callable(self.content)
                else self.content
            )
            payload = json.dumps(self.completion(body, content)).encode()
        else:
            raise ValueError(action)
        self.send(handler, status, payload, headers=headers)


# A stand-in for `python -m vllm.entrypoints.openai.api_server` (the tests replace the command): it answers
# GET /v1/models with the served name, "ok" to anything else, and leaves its pid beside its first argument
# when that is a path
FAKE_VLLM_SERVER = """
import http.server, json, os, sys
from pathlib import Path
name, port = sys.argv[sys.argv.index("--served-model-name") + 1], int(sys.argv[sys.argv.index("--port") + 1])
if not sys.argv[1].startswith("--"):  # a path to leave the pid beside
    Path(sys.argv[1]).with_name(f"server-{name}.pid").write_text(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": name}]}).encode() if self.path == "/v1/models" else b"ok"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
