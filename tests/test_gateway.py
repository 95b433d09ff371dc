"""The model gateway with the real Anthropic and OpenAI SDKs against a local stub server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest
from prometheus_client import REGISTRY

from actors.model import ModelGateway
from actors.providers._marking import UNTRUSTED_NOTE
from actors.resilience import CircuitBreaker
from bus import subjects
from bus.connection import Bus
from corral.client import Client
from schemas.config import parse_fleet
from schemas.events import LlmResponded
from schemas.messages import ChatMessage, ModelRequest, Usage
from schemas.routing import PriceSpec, call_cost_usd
from tests.conftest import fleet_in_process, task_events
from tests.llm_stub import (
    Stub,
    anthropic_text,
    anthropic_tool,
    error,
    openai_text,
    openai_tool,
    serve_stub,
)

KEY = "sk-test-SECRET-4242-do-not-log"


def unwrap(content: str, tool: str, call_id: str) -> str:
    """A tool result's content inside its untrusted-data marker (which must be there)."""
    head = f'<tool_result tool="{tool}" call="{call_id}" trust="untrusted">\n'
    assert content.startswith(head) and content.endswith("\n</tool_result>"), content
    return content[len(head):-len("\n</tool_result>")]

FLEET = """
[agents.support]
model = "{alias}"
system = "You answer questions about orders."
tools = ["lookup_order"]
max_turns = 4

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"

[models.claude]
provider = "anthropic"
model = "claude-test"
base_url = "{url}"
api_key_env = "CORRAL_TEST_KEY"
max_retries = 0

[models.gpt]
provider = "openai"
model = "gpt-test"
base_url = "{url}/v1"
api_key_env = "CORRAL_TEST_KEY"
max_retries = 0

[prices.claude-test]
input_per_mtok = 3.0
output_per_mtok = 15.0
cache_read_per_mtok = 0.3
cache_write_per_mtok = 3.75

[prices.gpt-test]
input_per_mtok = 2.5
output_per_mtok = 10.0
cache_read_per_mtok = 1.25
"""


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.setenv("CORRAL_TEST_KEY", KEY)
    with serve_stub() as s:
        yield s


def request(text: str = "Where is order 5678?", *, allow_cached: bool = True) -> ModelRequest:
    return ModelRequest(alias="x", agent="support", task_id="t1", turn=1,
                        allow_cached=allow_cached,
                        messages=[ChatMessage(role="user", content=text)])


@pytest.mark.parametrize("alias", ["claude", "gpt"])
async def test_tool_use_round_trip_through_the_fleet(bus: Bus, stub: Stub, alias: str) -> None:
    if alias == "claude":
        stub.queue(anthropic_tool("lookup_order", {"order_id": "5678"}, input_tokens=1000,
                                  output_tokens=50),
                   anthropic_text("Order 5678 is in transit.", input_tokens=1200,
                                  output_tokens=10, cache_read=400, cache_write=100))
    else:
        stub.queue(openai_tool("lookup_order", {"order_id": "5678"}, prompt=1000, completion=50),
                   openai_text("Order 5678 is in transit.", prompt=1600, completion=10,
                               cached=400, reasoning=4))
    fleet = parse_fleet(FLEET.format(alias=alias, url=stub.url))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("support", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed" and state.answer == "Order 5678 is in transit."
    assert len(stub.seen) == 2
    first, second = stub.seen
    assert first.body["stream"] is True  # a turn's call streams (its pieces go out as deltas)
    if alias == "claude":
        assert first.path == "/v1/messages"
        assert KEY in (first.headers.get("x-api-key", "") + first.headers.get("authorization", ""))
        # The same system prompt every turn (a stable cache prefix), with the note on data.
        assert first.body["system"] == second.body["system"] == (
            f"You answer questions about orders.\n\n{UNTRUSTED_NOTE}")
        assert first.body["tools"][0]["name"] == "lookup_order"
        assert first.body["tools"][0]["input_schema"]["required"] == ["order_id"]
        result = second.body["messages"][-1]["content"][0]
        assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
        assert json.loads(unwrap(result["content"], "lookup_order", "toolu_1"))["status"] \
            == "in transit"
    else:
        assert first.path == "/v1/chat/completions"
        assert first.headers["authorization"] == f"Bearer {KEY}"
        system = {"role": "system",
                  "content": f"You answer questions about orders.\n\n{UNTRUSTED_NOTE}"}
        assert first.body["messages"][0] == second.body["messages"][0] == system
        assert first.body["tools"][0]["function"]["name"] == "lookup_order"
        result = second.body["messages"][-1]
        assert result["role"] == "tool" and result["tool_call_id"] == "call_1"
        assert json.loads(unwrap(result["content"], "lookup_order", "call_1"))["status"] \
            == "in transit"
    responded = [e for e in await task_events(bus, task_id) if isinstance(e, LlmResponded)]
    assert [r.alias for r in responded] == [alias, alias]
    # Cost of each call, from the prices by hand:
    if alias == "claude":
        assert responded[0].response.cost_usd == pytest.approx((1000 * 3 + 50 * 15) / 1e6)
        assert responded[1].response.cost_usd == pytest.approx(
            (1200 * 3 + 10 * 15 + 400 * 0.3 + 100 * 3.75) / 1e6)
    else:
        assert responded[0].response.cost_usd == pytest.approx((1000 * 2.5 + 50 * 10) / 1e6)
        # 1600 prompt tokens of which 400 cached: 1200 at the input price, 400 at cache read.
        u = responded[1].response.usage
        assert (u.input_tokens, u.cache_read_tokens, u.reasoning_tokens) == (1200, 400, 4)
        assert responded[1].response.cost_usd == pytest.approx(
            (1200 * 2.5 + 10 * 10 + 400 * 1.25) / 1e6)
    assert state.cost_usd == pytest.approx(sum(r.response.cost_usd for r in responded))


def test_cost_math_for_each_token_kind() -> None:
    price = PriceSpec(input_per_mtok=3.0, output_per_mtok=15.0, cache_read_per_mtok=0.3,
                      cache_write_per_mtok=3.75)
    assert call_cost_usd(Usage(input_tokens=1_000_000), price) == pytest.approx(3.0)
    assert call_cost_usd(Usage(output_tokens=2_000_000), price) == pytest.approx(30.0)
    assert call_cost_usd(Usage(cache_read_tokens=10_000), price) == pytest.approx(0.003)
    assert call_cost_usd(Usage(cache_write_tokens=4_000), price) == pytest.approx(0.015)
    # Reasoning tokens are inside output_tokens: not billed twice.
    assert call_cost_usd(Usage(output_tokens=100, reasoning_tokens=60), price) == pytest.approx(
        100 * 15 / 1e6)
    assert call_cost_usd(Usage(input_tokens=5), None) == 0.0


async def test_429_with_retry_after_is_retried(bus: Bus, stub: Stub) -> None:
    text = FLEET.format(alias="claude", url=stub.url).replace(
        'api_key_env = "CORRAL_TEST_KEY"\nmax_retries = 0', 'api_key_env = "CORRAL_TEST_KEY"\n'
        'max_retries = 2', 1)
    slept: list[float] = []
    gateway = ModelGateway(bus, "claude", parse_fleet(text), sleep=slept.append)
    stub.queue(error(429, "slow down", retry_after="7"), anthropic_text("fine now"))
    response = await gateway.call(request())
    assert response.text == "fine now" and not response.error
    assert len(stub.seen) == 2
    assert slept == [7.0]  # the server asked for 7 s and got at least that
    assert gateway.breakers["anthropic:claude-test"].state == "closed"


async def test_client_errors_are_not_retried(bus: Bus, stub: Stub) -> None:
    gateway = ModelGateway(bus, "gpt", parse_fleet(FLEET.format(alias="gpt", url=stub.url)))
    stub.queue(error(400, "bad request"))
    response = await gateway.call(request())
    assert response.error_type == "ProviderUnavailable" and "HTTP 400" in response.error
    assert len(stub.seen) == 1


CHAIN = """
[agents.support]
model = "smart"
allow_cached = true

[models.smart]
breaker_failures = 2
breaker_cooldown_s = 30
cache_fallback = true

[[models.smart.chain]]
provider = "anthropic"
model = "claude-test"
base_url = "{primary}"
api_key_env = "CORRAL_TEST_KEY"
max_retries = 0

[[models.smart.chain]]
provider = "openai"
model = "gpt-test"
base_url = "{secondary}/v1"
api_key_env = "CORRAL_TEST_KEY"
max_retries = 0
"""


async def test_repeated_5xx_opens_the_breaker_and_the_chain_falls_back(
        bus: Bus, stub: Stub) -> None:
    now = [1000.0]
    with serve_stub() as secondary:
        primary = stub
        primary.default = error(503, "overloaded")
        secondary.default = openai_text("from the secondary")
        fleet = parse_fleet(CHAIN.format(primary=primary.url, secondary=secondary.url))
        gateway = ModelGateway(bus, "smart", fleet, clock=lambda: now[0])
        notices = await bus.nc.subscribe(subjects.breaker("smart"))

        r1 = await gateway.call(request())
        r2 = await gateway.call(request())
        assert r1.text == r2.text == "from the secondary"
        assert "anthropic:claude-test" in r1.fallbacks[0] and "503" in r1.fallbacks[0]
        breaker = gateway.breakers["anthropic:claude-test"]
        assert breaker.state == "open"
        # While open, the primary is skipped at once: no request reaches it.
        r3 = await gateway.call(request())
        assert r3.text == "from the secondary" and len(r3.fallbacks) == 1
        # The circuit names the failure that opened it, not just "circuit open".
        assert r3.fallbacks[0].startswith("anthropic:claude-test: circuit open (last error: ")
        assert "503" in r3.fallbacks[0]
        assert len(primary.seen) == 2
        note = json.loads((await notices.next_msg(timeout=2)).data)
        # A system event like any other: `corral events --system` shows it.
        assert note["type"] == "breaker.changed" and "503" in note["last_error"]
        assert (note["entry"], note["from_state"], note["to_state"]) == (
            "anthropic:claude-test", "closed", "open")
        gauge = REGISTRY.get_sample_value("corral_breaker_state",
                                          {"alias": "smart", "entry": "anthropic:claude-test"})
        assert gauge == 2  # open, as the metric shows it

        # Half-open after the cool-down: one probe goes through; it succeeds; closed again.
        primary.default = anthropic_text("primary is back")
        now[0] += 31
        assert breaker.state == "half-open"
        r4 = await gateway.call(request())
        assert r4.text == "primary is back" and r4.provider == "anthropic"
        assert breaker.state == "closed"
        assert REGISTRY.get_sample_value(
            "corral_breaker_state", {"alias": "smart", "entry": "anthropic:claude-test"}) == 0
        await notices.unsubscribe()


async def test_every_entry_down_serves_the_cached_answer_only_where_allowed(
        bus: Bus, stub: Stub) -> None:
    with serve_stub() as secondary:
        secondary.default = openai_text("remembered answer")
        stub.default = error(500)
        fleet = parse_fleet(CHAIN.format(primary=stub.url, secondary=secondary.url))
        gateway = ModelGateway(bus, "smart", fleet)
        first = await gateway.call(request())
        assert first.text == "remembered answer" and not first.cached
        secondary.default = error(502)
        again = await gateway.call(request())
        assert again.cached and again.text == "remembered answer" and again.cost_usd == 0
        refused = await gateway.call(request(allow_cached=False))
        assert refused.error_type == "ProviderUnavailable"
        other = await gateway.call(request("a question never asked before"))
        assert other.error_type == "ProviderUnavailable"


def test_breaker_half_open_probe_failure_reopens() -> None:
    now = [0.0]
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker("p:m", failures=3, cooldown_s=10, clock=lambda: now[0],
                       on_change=lambda _k, a, c: changes.append((a, c)))
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 10
    assert b.allow() and not b.allow()  # exactly one probe
    b.failure()
    assert b.state == "open"
    now[0] = 19
    assert not b.allow()
    now[0] = 20
    assert b.allow()
    b.success()
    assert b.state == "closed"
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open"),
                       ("open", "half-open"), ("half-open", "closed")]


async def test_no_key_or_authorization_header_reaches_events_or_logs(
        bus: Bus, stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    stub.queue(error(401, "invalid x-api-key"), anthropic_tool("lookup_order", {"order_id": "1"}),
               anthropic_text("no such order"))
    fleet = parse_fleet(FLEET.format(alias="claude", url=stub.url).replace(
        "max_turns = 4", "max_turns = 4\nmax_tokens = 64"))
    fleet = msgspec.structs.replace(fleet, runtime=msgspec.structs.replace(
        fleet.runtime, max_deliver=3))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("support", "Where is order 1?")
        state = await client.wait(task_id, timeout_s=30)
    # A 401 will not get better by asking again: the task fails at once, saying why.
    assert state.status == "failed" and "401" in state.error, state.error
    sent = stub.seen[0].headers
    assert KEY in sent.get("x-api-key", "") + sent.get("authorization", "")  # it went out…
    raw = b"".join(e.raw for e in (await _log(bus, task_id)))
    everything = raw.decode() + "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 401" in everything  # the failure is visible…
    for secret in (KEY, "x-api-key: sk", "Bearer sk", "authorization"):  # …the key is not
        assert secret.lower() not in everything.lower()


async def _log(bus: Bus, task_id: str) -> list[object]:
    from bus.eventlog import EventLog

    logged, _ = await EventLog(bus).read(task_id)
    return logged  # type: ignore[return-value]


