"""HTTP tools from an OpenAPI document (issue 10), against a local test server.

tests/fixtures/orders_openapi.json describes the API; tests/http_test_server.py
serves it on a thread of this process. The fleet runs in process on a real
nats-server, and a scripted model calls the tools: success, a 4xx the model
sees as ``tool.failed``, a 5xx retried with the same idempotency key, a
side-effecting call without one not sent twice, a response over the cap, a
redirect off the host, and the credential that reaches the server but no
event or log.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from actors.http_tool import HttpToolActor, retry_after_s
from actors.runtime import read_file
from bus.connection import Bus
from schemas.config import FleetConfig, parse_fleet, served_tools, tool_actor, tool_actors
from schemas.errors import ConfigError
from schemas.events import Event, ToolCompleted, ToolFailed, ToolRequested
from schemas.fold import TaskState
from schemas.openapi import default_side_effect, tool_suffix
from tests.conftest import REPO, fleet_in_process
from tests.http_test_server import FLAKY_FAILURES, OrdersServer
from tests.test_mcp import free_port, run_task

FIXTURES = REPO / "tests" / "fixtures"
SOURCE = str(FIXTURES / "orders-fleet.toml")  # the spec path is relative to it
TOKEN = "s3cret-orders-token-7f2c"
CAP = 64 * 1024

FLEET = """
[fleet]
name = "http-test"

[agents.clerk]
model = "m"
tools = ["orders__get_order", "orders__create_refund", "orders__create_note",
         "orders__get_report"]
max_turns = 4

[openapi.orders]
spec = "orders_openapi.json"
base_url = "{url}"
operations = ["getOrder", "createRefund", "createNote", "getReport"]
env = ["ORDERS_TOKEN"]
auth = {{ header = "Authorization", scheme = "Bearer", env = "ORDERS_TOKEN" }}
timeout_s = 20
max_response_bytes = {cap}

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "start"
when_user = "^order (?P<id>\\\\S+)"
call = "orders__get_order"
arguments = {{ order_id = "{{id}}", verbose = true }}

[[models.m.rules]]
after = "start"
when_user = "^refund (?P<id>\\\\S+)"
call = "orders__create_refund"
arguments = {{ order_id = "{{id}}", body = {{ amount = 5, reason = "late" }} }}

[[models.m.rules]]
after = "start"
when_user = "^note (?P<text>.*)"
call = "orders__create_note"
arguments = {{ body = {{ text = "{{text}}" }} }}

[[models.m.rules]]
after = "start"
when_user = "^report (?P<name>\\\\S+)"
call = "orders__get_report"
arguments = {{ name = "{{name}}" }}

[[models.m.rules]]
after = "tool"
reply = "ok: {{results}}"

[[models.m.rules]]
after = "tool_failed"
reply = "failed: {{error}}"
"""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OrdersServer]:
    """The orders API, and its token in the tool's declared variable."""
    monkeypatch.setenv("ORDERS_TOKEN", TOKEN)
    with OrdersServer() as s:
        yield s


def parse(text: str) -> FleetConfig:
    """The fleet, its document read as ``corral up`` reads it (``load_fleet``'s reader)."""
    return parse_fleet(text, SOURCE, read=read_file)


def variant_fleet(text: str) -> FleetConfig:
    """As ``tests.conftest.fleet_variant``: a short grace period for quick stops."""
    fleet = parse(text)
    return msgspec.structs.replace(fleet, runtime=msgspec.structs.replace(fleet.runtime,
                                                                          grace_s=2.0))


def http_fleet(server: OrdersServer) -> FleetConfig:
    return variant_fleet(FLEET.format(url=server.url, cap=CAP))


async def run(bus: Bus, text: str) -> tuple[TaskState, list[Event]]:
    return await run_task(bus, "clerk", text)


def failure(events: list[Event]) -> ToolFailed:
    [f] = [e for e in events if isinstance(e, ToolFailed)]
    return f


# -- through the whole fleet ---------------------------------------------------------------

async def test_a_call_succeeds_with_the_credential_which_no_event_or_log_shows(
        bus: Bus, server: OrdersServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with fleet_in_process(bus, http_fleet(server)) as actors:
        assert any(isinstance(a, HttpToolActor) and a.name == "orders" for a in actors)
        state, events = await run(bus, "order A1")
    assert state.status == "completed", state.error
    [done] = [e for e in events if isinstance(e, ToolCompleted)]
    assert (done.tool, done.actor.kind, done.actor.name) == ("orders__get_order", "tool",
                                                            "orders")
    assert done.result == {"id": "A1", "total": 42.5, "status": "shipped"}
    assert "42.5" in state.answer
    [got] = server.seen("GET", "/orders/")
    assert got["path"] == "/orders/A1?verbose=true"
    assert got["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert "idempotency-key" not in got["headers"]  # a GET: nothing to dedupe
    assert TOKEN not in msgspec.json.encode(events).decode()
    assert TOKEN not in caplog.text and "orders" in caplog.text  # the logs were captured


async def test_a_4xx_is_a_failure_the_model_sees_and_is_not_retried(
        bus: Bus, server: OrdersServer) -> None:
    async with fleet_in_process(bus, http_fleet(server)):
        state, events = await run(bus, "order Z9")
    f = failure(events)
    assert f.error_type == "ToolError" and f.tool == "orders__get_order"
    assert f.error.startswith("HTTP 404 from GET /orders/{order_id}: ")
    assert "no order Z9" in f.error
    assert state.status == "completed" and state.answer.startswith("failed: HTTP 404")
    assert len(server.seen("GET", "/orders/Z9")) == 1


async def test_a_5xx_is_retried_with_the_same_idempotency_key_until_it_succeeds(
        bus: Bus, server: OrdersServer) -> None:
    async with fleet_in_process(bus, http_fleet(server)):
        state, events = await run(bus, "refund flaky")
    assert state.status == "completed", state.error
    [requested] = [e for e in events if isinstance(e, ToolRequested)]
    [done] = [e for e in events if isinstance(e, ToolCompleted)]
    assert done.result == {"refund_id": "R1", "order": "flaky", "amount": 5}
    tries = server.seen("POST", "/orders/flaky/refunds")
    assert len(tries) == FLAKY_FAILURES + 1  # two 503s, then the refund
    assert {t["headers"]["idempotency-key"] for t in tries} == {requested.idempotency_key}
    assert all(t["body"] == {"amount": 5, "reason": "late"} for t in tries)
    assert len(server.refunds) == 1


async def test_a_5xx_of_a_read_is_retried_and_a_dead_server_is_a_failure_naming_it(
        bus: Bus, server: OrdersServer) -> None:
    port = free_port()  # nothing listens there
    gone = variant_fleet(FLEET.format(url=f"http://127.0.0.1:{port}", cap=CAP)
                         .replace("timeout_s = 20", "timeout_s = 1"))
    async with fleet_in_process(bus, http_fleet(server)):
        flaky, flaky_events = await run(bus, "report flaky")
    async with fleet_in_process(bus, gone):
        dead, dead_events = await run(bus, "order A1")
    [done] = [e for e in flaky_events if isinstance(e, ToolCompleted)]
    assert done.result == "report flaky: all good at last"
    assert len(server.seen("GET", "/reports/flaky")) == FLAKY_FAILURES + 1
    f = failure(dead_events)
    assert f.error_type == "ToolError" and f"cannot connect to 127.0.0.1:{port}" in f.error
    assert flaky.status == dead.status == "completed"


async def test_the_idempotency_header_goes_with_a_side_effecting_call_that_takes_one(
        bus: Bus, server: OrdersServer) -> None:
    fleet = http_fleet(server)
    assert fleet.tools["orders__create_refund"].accepts_idempotency_key
    assert not fleet.tools["orders__create_note"].accepts_idempotency_key
    async with fleet_in_process(bus, fleet):
        refund, refund_events = await run(bus, "refund A1")
        note, _ = await run(bus, "note hello")
    assert refund.status == note.status == "completed"
    [requested] = [e for e in refund_events if isinstance(e, ToolRequested)]
    [sent] = server.seen("POST", "/orders/A1/refunds")
    assert sent["headers"]["idempotency-key"] == requested.idempotency_key != ""
    [note_sent] = server.seen("POST", "/notes")
    assert "idempotency-key" not in note_sent["headers"]  # the API takes none there


async def test_a_side_effecting_5xx_without_an_idempotency_key_is_not_sent_again(
        bus: Bus, server: OrdersServer) -> None:
    async with fleet_in_process(bus, http_fleet(server)):
        state, events = await run(bus, "note flaky one")
    f = failure(events)
    assert f.error_type == "OutcomeUnknown"
    assert "HTTP 503" in f.error and "not sent again" in f.error
    assert state.answer.startswith("failed: ")
    assert len(server.seen("POST", "/notes")) == 1


async def test_a_429_is_sent_again_after_its_retry_after_even_when_side_effecting(
        bus: Bus, server: OrdersServer) -> None:
    # A 429 was refused unprocessed: sending it again cannot do the effect twice.
    async with fleet_in_process(bus, http_fleet(server)):
        busy, _ = await run(bus, "note busy day")
        swamped, events = await run(bus, "note swamped")
    assert busy.status == "completed" and "busy day" in busy.answer
    tries = server.seen("POST", "/notes")
    assert [t["body"]["text"] for t in tries] == ["busy day"] * (FLAKY_FAILURES + 1) \
        + ["swamped"]
    # One that asks for a day, past timeout_s: not waited for; the model reads why.
    f = failure(events)
    assert f.error_type == "ToolError" and "HTTP 429" in f.error
    assert "it asks to wait 86400s, past the tool's timeout_s (20s)" in f.error
    assert swamped.answer.startswith("failed: ")


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("120") == 120.0 and retry_after_s(" 0 ") == 0.0
    now = 1_796_560_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_s(date, now=now) == pytest.approx(30.0, abs=1.0)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for junk in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2026", "9" * 400):
        got = retry_after_s(junk)
        assert got is None or 0 <= got <= 86_400 * 365, (junk, got)
    assert retry_after_s("soon") is None and retry_after_s("-5") is None


async def test_an_answer_over_the_cap_fails_cleanly_and_redirects_stay_on_the_host(
        bus: Bus, server: OrdersServer) -> None:
    async with fleet_in_process(bus, http_fleet(server)):
        big, big_events = await run(bus, "report big")
        away, away_events = await run(bus, "report away")
        here, here_events = await run(bus, "report here")
    f = failure(big_events)
    assert f.error_type == "ToolError"
    assert f"over max_response_bytes ({CAP} bytes)" in f.error
    assert big.status == "completed" and big.answer.startswith("failed: ")
    f = failure(away_events)
    assert "redirected to another host (http://elsewhere.invalid)" in f.error
    [done] = [e for e in here_events if isinstance(e, ToolCompleted)]
    assert done.result == "report small: all good"  # a same-host redirect is followed
    # The token went to the test server only: the redirect to elsewhere was never sent.
    assert [r["path"] for r in server.seen("GET", "/reports/")] == [
        "/reports/big", "/reports/away", "/reports/here", "/reports/small"]
    assert here.status == away.status == "completed"


async def test_a_missing_credential_is_a_failure_naming_the_variable(
        bus: Bus, server: OrdersServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERS_TOKEN")
    async with fleet_in_process(bus, http_fleet(server)):
        _, events = await run(bus, "order A1")
    assert "ORDERS_TOKEN is not set" in failure(events).error
    assert server.seen("GET", "/orders/") == []


# -- the document and the config -----------------------------------------------------------

def test_operations_become_tools_with_one_json_schema_each() -> None:
    fleet = parse(FLEET.format(url="http://127.0.0.1:1", cap=CAP))
    assert tool_actors(fleet) == {"orders": 1}
    assert tool_actor(fleet, "orders__get_order") == "orders"
    assert served_tools(fleet, "orders") == ["orders__get_order", "orders__create_refund",
                                              "orders__create_note", "orders__get_report"]
    get = fleet.tools["orders__get_order"]
    assert get.openapi == "orders" and get.side_effect == "none"
    assert get.description == ("Look up an order by its id.\n\n"
                               "Returns the order's total and status.")
    assert get.parameters is not None
    assert get.parameters["required"] == ["order_id"]
    assert set(get.parameters["properties"]) == {"order_id", "verbose", "X-Trace"}
    refund = fleet.tools["orders__create_refund"]
    assert refund.side_effect == "side-effecting" and refund.env == ["ORDERS_TOKEN"]
    assert refund.parameters is not None
    # The idempotency header is corral's to fill in: the model never sees it.
    assert set(refund.parameters["properties"]) == {"order_id", "body"}
    assert refund.parameters["properties"]["body"]["required"] == ["amount"]  # $ref inlined
    for spec in fleet.tools.values():
        assert spec.parameters is not None
        jsonschema.Draft202012Validator.check_schema(spec.parameters)
    v = jsonschema.Draft202012Validator(refund.parameters)
    assert not list(v.iter_errors({"order_id": "A1", "body": {"amount": 5}}))
    assert list(v.iter_errors({"order_id": "A1", "body": {"amount": -1}}))
    assert list(v.iter_errors({"order_id": "A1", "body": {"amount": 5}, "extra": 1}))


def test_the_document_is_read_only_through_the_reader_given() -> None:
    text = FLEET.format(url="http://127.0.0.1:1", cap=CAP)
    with pytest.raises(ConfigError, match="needs its document read") as info:
        parse_fleet(text, SOURCE)  # schemas does no I/O of its own
    assert "openapi.orders" in str(info.value) and "spec" in str(info.value)
    asked: list[str] = []

    def reader(path: str) -> bytes:
        asked.append(path)
        return read_file(path)

    parse_fleet(text, SOURCE, read=reader)
    assert asked == [str(FIXTURES / "orders_openapi.json")]


def test_a_yaml_document_reads_as_its_json_twin() -> None:
    # The fixture as YAML, status codes unquoted (YAML reads `200:` as a number).
    doc = json.loads((FIXTURES / "orders_openapi.json").read_text())
    text = re.sub(r"'(\d{3})':", r"\1:", yaml.safe_dump(doc, sort_keys=False))
    assert re.search(r"^ +200:", text, re.MULTILINE)
    docs = {"orders.yaml": text.encode(), "broken.yml": b"paths: [unclosed",
            "list.yaml": b"- a\n- b\n", "bomb.yaml": _alias_bomb()}

    def reader(path: str) -> bytes:
        return docs[Path(path).name]

    def load(name: str) -> FleetConfig:
        return parse_fleet(variant(spec=f'"{name}"'), SOURCE, read=reader)

    from_yaml, from_json = load("orders.yaml"), parse(FLEET.format(url="http://127.0.0.1:1",
                                                                  cap=CAP))
    assert {n: (t.parameters, t.side_effect, t.description)
            for n, t in from_yaml.tools.items()} == {
        n: (t.parameters, t.side_effect, t.description) for n, t in from_json.tools.items()}
    for name, match in (("broken.yml", "broken.yml' is not YAML: while parsing"),
                        ("list.yaml", "list.yaml' is not a YAML mapping"),
                        ("bomb.yaml", "is over 1,000,000 values once its aliases are expanded")):
        with pytest.raises(ConfigError, match=match) as info:
            load(name)
        assert "openapi.orders" in str(info.value) and "'spec'" in str(info.value)


def _alias_bomb() -> bytes:
    """A few hundred bytes of YAML that are 10^9 values once its aliases are expanded."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines).encode()


def test_names_and_default_side_effects() -> None:
    assert tool_suffix("getOrder") == "get_order"
    assert tool_suffix("list-orders.v2") == "list_orders_v2"
    assert [default_side_effect(m) for m in ("GET", "HEAD", "PUT", "DELETE", "POST", "PATCH")] \
        == ["none", "none", "idempotent", "idempotent", "side-effecting", "side-effecting"]


def variant(**changes: Any) -> str:
    """The test fleet's [openapi.orders] table with some keys changed (TOML values)."""
    text = FLEET.format(url="http://127.0.0.1:1", cap=CAP)
    for key, value in changes.items():
        lines = text.split("\n")
        start = lines.index("[openapi.orders]")
        end = lines.index("", start)
        kept = [ln for ln in lines[start + 1:end] if not ln.startswith(f"{key} =")]
        lines[start + 1:end] = kept + ([f"{key} = {value}"] if value is not None else [])
        text = "\n".join(lines)
    return text


@pytest.mark.parametrize(("changes", "match"), [
    ({"operations": '["getOrdr", "createRefund", "createNote", "getReport"]'},
     "no operation 'getOrdr' in the document; did you mean 'getOrder'\\?"),
    ({"spec": '"missing.json"'}, "cannot read .*missing.json"),
    ({"base_url": '"ftp://h"'}, "http:// or https://"),
    ({"auth": '{ env = "OTHER" }'}, "auth.env 'OTHER' must be one of"),
    ({"side_effect": '{ getOrdr = "none" }'}, "did you mean 'getOrder'"),
    ({"max_response_bytes": "0"}, "must be positive"),
    ({"operations": "[]"}, "exposes no operation"),
    ({"operations": None}, "operations"),
])
def test_config_mistakes_name_the_table_and_key(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse(variant(**changes))
    assert "openapi.orders" in str(info.value) and "orders-fleet.toml" in str(info.value)


def test_a_python_tool_cannot_claim_to_be_an_operation() -> None:
    text = variant() + '[tools.x]\nfunction = "m:f"\nopenapi = "orders"\n'
    with pytest.raises(ConfigError, match=re.escape("come from its [openapi.orders] table")):
        parse(text)


def test_an_agent_listing_an_operation_not_exposed_is_a_config_error() -> None:
    text = variant(operations='["getOrder", "createRefund", "createNote"]')
    with pytest.raises(ConfigError, match=re.escape(
            "unknown tool 'orders__get_report': [openapi.orders] exposes orders__get_order, ")):
        parse(text)
