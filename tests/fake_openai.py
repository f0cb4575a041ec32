"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (remote backend, remote judge and MRM).

The server answers at most `max_requests` requests, shuts itself down after `lifetime_s` and is
stopped by its owner; nothing else is contacted.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0


def ok(text: str) -> Reply:
    return Reply(body={"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "test"}}, headers=headers)


@dataclasses.dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


class FakeServer:
    """`respond(index, seen) -> Reply` scripts the answers; requests and concurrency are recorded."""

    def __init__(self, respond: Callable[[int, Seen], Reply], *, max_requests: int = 64, lifetime_s: float = 20.0):
        self.respond = respond
        self.max_requests = max_requests
        self.seen: list[Seen] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                seen = Seen(self.path, dict(self.headers.items()), body)
                with server.lock:
                    index = len(server.seen)
                    server.seen.append(seen)
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    reply = (server.respond(index, seen) if index < server.max_requests
                             else error(503, "fake server request budget spent"))
                    if reply.delay:
                        time.sleep(reply.delay)
                finally:
                    with server.lock:  # before answering: the client may send its next request at once
                        server.active -= 1
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.timer = threading.Timer(lifetime_s, self.httpd.shutdown)
        self.timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FakeServer:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
