"""Secrets stay where they are used: keys only in gateways, a tool's env only in that tool,
and no key material in provider error text."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.model import ModelGateway
from actors.providers import REDACTED, scrub
from actors.providers.anthropic_provider import AnthropicProvider
from actors.providers.openai_provider import OpenAIProvider
from bus.auth import embedded_auth_dir, load_creds
from bus.connection import Bus
from schemas.config import parse_fleet
from schemas.errors import ProviderError
from schemas.messages import ChatMessage, ModelRequest
from schemas.routing import RouteEntry
from supervisors.child import child_env
from tests.llm_stub import Stub, error, serve_stub
from tests.supervision_helpers import env_without_nats, process_environs, tree_config

CORRAL = [sys.executable, "-m", "corral"]

PROVIDER_KEY = "sk-fleet-test-4f1c9a7e2b6d8035-provider"
TOOL_TOKEN = "tooltoken-93b1e6c2d7a4f058"
SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-default-anthropic-5d2c8e",
    "OPENAI_API_KEY": "sk-proj-default-openai-7a1f3b",
    "FLEET_TEST_PROVIDER_KEY": PROVIDER_KEY,
    "FLEET_TEST_TOOL_TOKEN": TOOL_TOKEN,
    "SOME_DATABASE_PASSWORD": "hunter2-hunter2",
}

SEED = re.compile(r"\bS[UAON][A-Z2-7]{54,56}\b")  # an nkey seed: user, account, operator, server

KEYED = """
[models.keyed]                       # a gateway that holds a key (never called here)
provider = "anthropic"
model = "claude-test"
base_url = "http://127.0.0.1:9"
api_key_env = "FLEET_TEST_PROVIDER_KEY"
"""


def test_child_env_is_an_allow_list_plus_the_named_secrets() -> None:
    base = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "PYTHONPATH": "x", "CORRAL_HOME": "c",
            "OTEL_SERVICE_NAME": "s", "NATS_URL": "nats://x", **SECRETS}
    env = child_env(base, ["FLEET_TEST_TOOL_TOKEN", "NOT_SET"])
    assert env == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "PYTHONPATH": "x",
                   "CORRAL_HOME": "c", "OTEL_SERVICE_NAME": "s", "NATS_URL": "nats://x",
                   "FLEET_TEST_TOOL_TOKEN": TOOL_TOKEN}


def test_keys_reach_only_the_gateway_and_a_tool_only_its_declared_env(home: Path) -> None:
    text = tree_config(home, "").read_text()  # the demo fleet, default tree
    text = text.replace('function = "corral.demo.tools:lookup_order"',
                        'function = "tests.env_probe_tool:lookup_order"\n'
                        'env = ["FLEET_TEST_TOOL_TOKEN"]')
    config = home / "fleet.toml"
    config.write_text(text + KEYED)
    env = {**env_without_nats(home), **SECRETS}
    up = subprocess.Popen([*CORRAL, "up", "--config", str(config)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        printed = []
        for line in up.stdout:
            printed.append(line)
            if "ready" in line:
                break
        else:
            raise AssertionError("corral up did not get ready:\n" + "".join(printed))
        done = subprocess.run([*CORRAL, "submit", "triage", "Where is order 5678?", "--wait"],
                              env=env_without_nats(home), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        ps = subprocess.run([*CORRAL, "ps", "--json"], env=env_without_nats(home),
                            capture_output=True, text=True, timeout=60, check=True)
        seen = process_environs(ps.stdout)
        events = subprocess.run([*CORRAL, "events", "--json"], env=env_without_nats(home),
                                capture_output=True, text=True, timeout=60, check=True)
    finally:
        up.terminate()
        rest, _ = up.communicate(timeout=60)

    def secrets_in(name: str) -> set[str]:
        return {k for k in SECRETS if k in seen[name]}

    assert secrets_in("model.keyed.0") == {"FLEET_TEST_PROVIDER_KEY"}
    assert seen["model.keyed.0"]["FLEET_TEST_PROVIDER_KEY"] == PROVIDER_KEY
    assert secrets_in("tool.lookup_order.0") == {"FLEET_TEST_TOOL_TOKEN"}
    for name in ("agent.triage.0", "agent.billing.0", "agent.support.0", "agents",
                 "tool.issue_refund.0", "tool.send_email.0", "model.support-model.0"):
        assert secrets_in(name) == set(), name
    assert secrets_in("models") == {"FLEET_TEST_PROVIDER_KEY"}  # it starts the gateway
    for name, env_of in seen.items():  # what a process needs to run still gets there
        assert {"PATH", "CORRAL_HOME", "NATS_URL"} <= set(env_of), name
    # The tool ran (the task needed it) and saw its own token and nothing else secret.
    names = set(json.loads((home / "env-seen.json").read_text()))
    assert names & set(SECRETS) == {"FLEET_TEST_TOOL_TOKEN"}
    # NATS keys (ADR 0008): each process got the path of its own credential, and no nkey
    # seed (SU...) is anywhere a person or another process can read it.
    creds = sorted((embedded_auth_dir(home) / "creds").glob("*.creds"))
    seeds = [load_creds(p).seed.decode() for p in creds]
    user_seeds = bool(seeds) and all(s.startswith("SU") for s in seeds)
    assert user_seeds, "no nkey user seeds in the credentials"  # (never print a seed)
    for name, env_of in seen.items():
        assert Path(env_of["CORRAL_CREDS"]).parent == creds[0].parent, name
        assert not any(seed in v for v in env_of.values() for seed in seeds), name
    texts = {"corral up": "".join(printed) + rest, "corral ps": ps.stdout,
             "corral events": events.stdout, "submit": done.stdout + done.stderr,
             **{p.name: p.read_text(errors="replace") for p in (home / "logs").glob("*.log")},
             "nats.log": (home / "nats" / "nats.log").read_text(errors="replace")}
    for where, text in texts.items():
        assert not SEED.search(text), f"an nkey seed in {where}"
        assert not any(seed in text for seed in seeds), f"a seed of ours in {where}"


def test_scrub_removes_keys_fragments_and_key_shapes() -> None:
    key = "sk-test-SECRET-4242-do-not-log"
    assert scrub(f"Incorrect API key provided: {key}.", [key]) == \
        f"Incorrect API key provided: {REDACTED}."
    masked = scrub("key SECRET-4242-d**** was refused", [key])
    assert "SECRET-4242" not in masked and "was refused" in masked
    for text in ("Bearer abcdefgh12345678", "sk-ant-api03-abcdefgh", "x-api-key: qwertyuiop12"):
        assert scrub(text) in (REDACTED, f"x-api-key: {REDACTED}"), text
    assert scrub("HTTP 401: unauthorized") == "HTTP 401: unauthorized"


KEY = "sk-test-ECHOED-77f2a9c4e1b0-key"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.setenv("CORRAL_TEST_ECHO_KEY", KEY)
    with serve_stub() as s:
        yield s


def fragments(text: str) -> list[str]:
    """Every piece of ``KEY`` of 8 characters or more that ``text`` holds."""
    return [KEY[i:i + 8] for i in range(len(KEY) - 7) if KEY[i:i + 8] in text]


ECHO_FLEET = """
[agents.support]
model = "{alias}"

[models.claude]
provider = "anthropic"
model = "claude-test"
base_url = "{url}"
api_key_env = "CORRAL_TEST_ECHO_KEY"
max_retries = 0

[models.gpt]
provider = "openai"
model = "gpt-test"
base_url = "{url}/v1"
api_key_env = "CORRAL_TEST_ECHO_KEY"
max_retries = 0
"""


@pytest.mark.parametrize("alias", ["claude", "gpt"])
async def test_a_401_that_echoes_the_key_leaves_no_key_in_errors(bus: Bus, stub: Stub,
                                                                 alias: str) -> None:
    echo = error(401, f"Incorrect API key provided: {KEY}. Also: Bearer {KEY}")
    provider_cls = AnthropicProvider if alias == "claude" else OpenAIProvider
    url = stub.url if alias == "claude" else f"{stub.url}/v1"
    entry = RouteEntry(provider="anthropic" if alias == "claude" else "openai",
                       model="m", base_url=url, api_key_env="CORRAL_TEST_ECHO_KEY",
                       max_retries=0)
    provider = provider_cls(entry, KEY)
    request = ModelRequest(alias=alias, agent="support", task_id="t1", turn=1,
                           messages=[ChatMessage(role="user", content="hi")])
    stub.queue(echo)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(request, entry)
    finally:
        await provider.aclose()
    err = caught.value
    assert "HTTP 401" in str(err) and REDACTED in str(err)
    chain = [str(err), str(err.__cause__ or ""), str(err.__context__ or "")
             if not err.__suppress_context__ else ""]
    assert fragments("\n".join(chain)) == []

    stub.queue(echo)
    gateway = ModelGateway(bus, alias, parse_fleet(ECHO_FLEET.format(alias=alias, url=stub.url)))
    response = await gateway.call(request)
    assert "HTTP 401" in response.error
    assert fragments(response.error) == []
    assert stub.seen[-1].headers  # the key did go out, to the provider only
