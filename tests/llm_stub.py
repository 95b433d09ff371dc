"""A local HTTP server that speaks the Anthropic Messages and OpenAI Chat Completions
wire formats, so the real SDKs can be tested with no network.

Each test queues replies (status, JSON body, headers); every request is recorded.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.otlp_receiver import serve_in_thread


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Stub:
    """Replies in order; when the queue is empty the ``default`` reply repeats."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default: Reply | None = None
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.url = ""
        # Computes a reply from (path, body) when nothing is queued; set by `answer_any`.
        self.answer: Callable[[str, dict[str, Any]], Reply] | None = None

    def queue(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def next_reply(self, path: str = "", body: dict[str, Any] | None = None) -> Reply:
        with self.lock:
            if self.replies:
                return self.replies.popleft()
        if self.answer is not None:
            return self.answer(path, body or {})
        if self.default is None:
            return Reply(500, {"error": {"type": "api_error", "message": "stub: no reply queued"}})
        return self.default


def anthropic_text(text: str, *, model: str = "claude-test", input_tokens: int = 100,
                   output_tokens: int = 20, cache_read: int = 0, cache_write: int = 0) -> Reply:
    return Reply(200, {
        "id": "msg_test", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cache_read_input_tokens": cache_read,
                  "cache_creation_input_tokens": cache_write},
    })


def anthropic_tool(name: str, arguments: dict[str, Any], *, call_id: str = "toolu_1",
                   model: str = "claude-test", input_tokens: int = 100,
                   output_tokens: int = 20) -> Reply:
    return Reply(200, {
        "id": "msg_test", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": call_id, "name": name, "input": arguments}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    })


def openai_text(text: str, *, model: str = "gpt-test", prompt: int = 100, completion: int = 20,
                cached: int = 0, reasoning: int = 0) -> Reply:
    return Reply(200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached},
                  "completion_tokens_details": {"reasoning_tokens": reasoning}},
    })


def openai_tool(name: str, arguments: dict[str, Any], *, call_id: str = "call_1",
                model: str = "gpt-test", prompt: int = 100, completion: int = 20) -> Reply:
    return Reply(200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": name, "arguments": json.dumps(arguments)}}]}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })


def error(status: int, message: str = "stub error", **headers: str) -> Reply:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    return Reply(status, {"type": "error", "error": {"type": kind, "message": message}},
                 {k.replace("_", "-"): v for k, v in headers.items()})


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)] if text else []


def openai_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat completion as the chunks of its stream (text word by word, usage last)."""
    base = {"id": body.get("id", "chatcmpl-test"), "object": "chat.completion.chunk",
            "created": 1, "model": body.get("model", "")}
    choice = body["choices"][0]
    msg = choice["message"]
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]}]
    out += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
            for p in _pieces(msg.get("content") or "")]
    for i, call in enumerate(msg.get("tool_calls") or []):
        out.append({**base, "choices": [{"index": 0, "finish_reason": None, "delta": {
            "tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": {
                "name": call["function"]["name"], "arguments": call["function"]["arguments"]}}]}}]})
    out.append({**base, "choices": [{"index": 0, "delta": {},
                                     "finish_reason": choice["finish_reason"]}]})
    out.append({**base, "choices": [], "usage": body.get("usage")})
    return out


def anthropic_events(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Messages API answer as the events of its stream (text word by word)."""
    usage = dict(body.get("usage") or {})
    start = {**body, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for i, block in enumerate(body["content"]):
        if block["type"] == "text":
            out.append({"type": "content_block_start", "index": i,
                        "content_block": {"type": "text", "text": ""}})
            out += [{"type": "content_block_delta", "index": i,
                     "delta": {"type": "text_delta", "text": p}} for p in _pieces(block["text"])]
        else:
            out.append({"type": "content_block_start", "index": i,
                        "content_block": {**block, "input": {}}})
            out.append({"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        out.append({"type": "content_block_stop", "index": i})
    out.append({"type": "message_delta", "delta": {"stop_reason": body["stop_reason"],
                                                    "stop_sequence": None},
                "usage": {"output_tokens": usage.get("output_tokens", 0)}})
    out.append({"type": "message_stop"})
    return out


@contextmanager
def serve_stub(port: int = 0) -> Iterator[Stub]:
    stub = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            stub.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()},
                                  body))
            reply = stub.next_reply(self.path, body)
            if body.get("stream") and reply.status == 200:
                self._stream(reply)
                return
            data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", "req_stub")
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, reply: Reply) -> None:
            """The reply as server-sent events, the way the provider streams it."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("request-id", "req_stub")
            self.end_headers()
            anthropic = reply.body.get("type") == "message"
            for event in (anthropic_events(reply.body) if anthropic
                          else openai_chunks(reply.body)):
                name = f"event: {event['type']}\n" if anthropic else ""
                self.wfile.write(f"{name}data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            if not anthropic:
                self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_in_thread(Handler, port) as url:
        stub.url = url
        yield stub


def answer_any(stub: Stub, fail: int = 0) -> None:
    """Answer every request in the wire format its path asks for, naming the model.

    ``/v1/messages`` gets an Anthropic reply, anything else an OpenAI one; the text
    says which model answered and repeats the question, so a reader sees the route.
    With ``fail``, every request gets that HTTP status instead (a provider that is down).
    """
    stub.answer = lambda path, body: _answer(path, body, fail)


def _answer(path: str, body: dict[str, Any], fail: int) -> Reply:
    if fail:
        return error(fail, f"stub: answering {fail} on purpose")
    model = str(body.get("model", ""))
    asked = ""
    for message in body.get("messages", []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            asked = message["content"]
            break
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            texts = [p.get("text", "") for p in message["content"] if isinstance(p, dict)]
            asked = " ".join(t for t in texts if t)
            break
    text = f"({model} at the stub) you asked: {asked}"
    if path.rstrip("/").endswith("/messages"):
        return anthropic_text(text, model=model, input_tokens=900, output_tokens=60)
    return openai_text(text, model=model, prompt=900, completion=60)


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.llm_stub [--port 8999] [--fail 503]``: a stand-in for a provider.

    It speaks both the OpenAI Chat Completions (``/v1/chat/completions``) and the
    Anthropic Messages (``/v1/messages``) formats, prints its URL, and answers every
    request until it is stopped (900 input and 60 output tokens each).
    """
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m tests.llm_stub", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--fail", type=int, default=0, metavar="STATUS",
                        help="answer every request with this HTTP status (e.g. 503)")
    args = parser.parse_args(argv)
    with serve_stub(port=args.port) as stub:
        answer_any(stub, args.fail)
        print(stub.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
