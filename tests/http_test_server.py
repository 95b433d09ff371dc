"""A tiny HTTP server for tests/fixtures/orders_openapi.json (stdlib only).

Runs on a thread of the test process, on 127.0.0.1 and a free port, and
records every request it got (method, path, headers, body) so tests can see
what corral sent. Its answers:

- ``GET /orders/A1``: 200 with the order; any other id: 404.
- ``POST /orders/<id>/refunds``: 201 with a refund, once per
  ``Idempotency-Key`` (a key seen before gets the same refund back); for the
  order ``flaky`` the first ``FLAKY_FAILURES`` tries of a key are 503s.
- ``POST /notes``: 201, or 503 when the text starts with "flaky"; "busy": 429 with
  ``Retry-After: 1`` for the first ``FLAKY_FAILURES`` tries of that text;
  "swamped": 429 with ``Retry-After: 86400``, always.
- ``GET /reports/big``: a text bigger than the tests' response cap;
  ``/reports/flaky``: 502 for the first ``FLAKY_FAILURES`` tries, then a text;
  ``/reports/away``: a redirect to another host; ``/reports/here``: one to
  ``/reports/small`` (same host); ``/reports/<other>``: a short text.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FLAKY_FAILURES = 2
BIG_BYTES = 256 * 1024


class OrdersServer:
    """The server and what it saw; a context manager that starts and stops it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.refunds: dict[str, dict[str, Any]] = {}  # by Idempotency-Key
        self.tries: dict[str, int] = {}  # by Idempotency-Key
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> OrdersServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def seen(self, method: str, prefix: str) -> list[dict[str, Any]]:
        """The requests of ``method`` whose path starts with ``prefix``."""
        with self.lock:
            return [r for r in self.requests
                    if r["method"] == method and r["path"].startswith(prefix)]


def _handler(server: OrdersServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: Any, *, kind: str = "application/json",
                    headers: dict[str, str] | None = None) -> None:
            data = (json.dumps(body) if kind == "application/json" else str(body)).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            entry = {"method": self.command, "path": self.path,
                     "headers": {k.lower(): v for k, v in self.headers.items()},
                     "body": json.loads(raw) if raw else None}
            with server.lock:
                server.requests.append(entry)
            return entry

        def do_GET(self) -> None:
            self._record()
            path = self.path.split("?")[0]
            if path.startswith("/orders/"):
                order = path.removeprefix("/orders/")
                if order == "A1":
                    self._answer(200, {"id": "A1", "total": 42.5, "status": "shipped"})
                else:
                    self._answer(404, {"error": f"no order {order}"})
            elif path == "/reports/big":
                self._answer(200, "x" * BIG_BYTES, kind="text/plain")
            elif path == "/reports/away":
                self._answer(302, "", kind="text/plain",
                             headers={"Location": "http://elsewhere.invalid/steal"})
            elif path == "/reports/flaky":
                with server.lock:
                    server.tries[path] = tries = server.tries.get(path, 0) + 1
                if tries <= FLAKY_FAILURES:
                    self._answer(502, {"error": "bad gateway"})
                else:
                    self._answer(200, "report flaky: all good at last", kind="text/plain")
            elif path == "/reports/here":
                self._answer(302, "", kind="text/plain", headers={"Location": "/reports/small"})
            elif path.startswith("/reports/"):
                self._answer(200, f"report {path.removeprefix('/reports/')}: all good",
                             kind="text/plain")
            else:
                self._answer(404, {"error": "no such path"})

        def do_POST(self) -> None:
            entry = self._record()
            path = self.path.split("?")[0]
            if path.startswith("/orders/") and path.endswith("/refunds"):
                order = path.split("/")[2]
                key = entry["headers"].get("idempotency-key", "")
                with server.lock:
                    server.tries[key] = tries = server.tries.get(key, 0) + 1
                    done = server.refunds.get(key)
                if done is None and order == "flaky" and tries <= FLAKY_FAILURES:
                    self._answer(503, {"error": "try again later"})
                    return
                if done is None:
                    done = {"refund_id": f"R{len(server.refunds) + 1}", "order": order,
                            "amount": entry["body"]["amount"]}
                    with server.lock:
                        server.refunds[key] = done
                self._answer(201, done)
            elif path == "/notes":
                text = str(entry["body"].get("text", ""))
                with server.lock:
                    server.tries[text] = tries = server.tries.get(text, 0) + 1
                if text.startswith("flaky"):
                    self._answer(503, {"error": "overloaded"})
                elif text.startswith("busy") and tries <= FLAKY_FAILURES:
                    self._answer(429, {"error": "slow down"}, headers={"Retry-After": "1"})
                elif text.startswith("swamped"):
                    self._answer(429, {"error": "come back tomorrow"},
                                 headers={"Retry-After": "86400"})
                else:
                    self._answer(201, {"note": entry["body"]["text"]})
            else:
                self._answer(404, {"error": "no such path"})

    return Handler
