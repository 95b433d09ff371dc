"""``corral doctor``: one line per check, what to do for each problem, exit 1 on a failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.runtime import load_fleet
from bus import subjects
from bus.connection import Bus
from bus.server import EmbeddedServer, free_port
from corral.cli import main
from corral.doctor import credentials_checks
from corral.fleetrun import provision_fleet
from tests.conftest import DEMO_CONFIG, demo_fleet

ACTOR_CONSUMERS = ["agent_triage", "agent_billing", "agent_support", "tool_lookup_order",
                   "tool_issue_refund", "tool_send_email", "tool_time", "model_support-model"]
STREAMS = ["CORRAL_TASKS", "CORRAL_TOOLS", "CORRAL_MODELS", "CORRAL_EVENTS", "CORRAL_APPROVALS",
           "CORRAL_ANCHORS", "CORRAL_SYSTEM", "CORRAL_DLQ"]


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CREDS", raising=False)
    monkeypatch.delenv("CORRAL_CREDS_DIR", raising=False)


async def doctor(capsys: pytest.CaptureFixture[str], *args: str,
                 config: Path = DEMO_CONFIG) -> tuple[int, str]:
    """Run ``corral doctor`` as the CLI does (its own event loop, in a worker thread)."""
    capsys.readouterr()
    argv = ["doctor", "--config", str(config), *args]
    rc = await anyio.to_thread.run_sync(main, argv)
    return rc, capsys.readouterr().out


async def doctor_json(capsys: pytest.CaptureFixture[str], config: Path = DEMO_CONFIG
                      ) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """Exit status and the checks by name (a name can repeat: dead letters per subject)."""
    rc, out = await doctor(capsys, "--json", config=config)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for c in json.loads(out):
        assert set(c) == {"check", "status", "detail", "fix"}
        by_name.setdefault(c["check"], []).append(c)
    return rc, by_name


def only(checks: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
    [check] = checks[name]
    return check


async def test_healthy_server_after_provisioning_passes(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    await provision_fleet(bus, load_fleet(DEMO_CONFIG))  # the fleet doctor checks (its MCP too)

    rc, checks = await doctor_json(capsys)

    assert rc == 0, checks
    expected = ["python", "venv", "command", "fleet", "tools", "nats", "server", "jetstream",
                *(f"stream {s}" for s in STREAMS), "kv",
                *(f"consumer {c}" for c in ACTOR_CONSUMERS),
                "dead letters", "clock", "credentials", "disk"]
    assert list(checks) == expected
    assert not [c for cs in checks.values() for c in cs if c["status"] == "FAIL"]
    for name in ["fleet", "tools", "nats", "server", "jetstream", "kv", "dead letters", "clock",
                 *(f"stream {s}" for s in STREAMS), *(f"consumer {c}" for c in ACTOR_CONSUMERS)]:
        assert only(checks, name)["status"] == "ok", checks[name]
    assert nats_server.url in only(checks, "nats")["detail"]
    creds = only(checks, "credentials")
    assert creds["status"] == "warn" and "unauthenticated server" in creds["detail"]
    assert creds["fix"]


async def test_no_server_fails_and_says_to_start_one(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = await doctor(capsys)

    assert rc == 1
    lines = out.splitlines()
    [i] = [n for n, line in enumerate(lines) if line.startswith("FAIL  nats")]
    assert "no NATS server" in lines[i]
    assert "corral up" in lines[i + 1] and "NATS_URL" in lines[i + 1]
    assert lines[-1].endswith("1 failure")
    # Nothing past the missing server is guessed at.
    assert not any(line.split()[1:2] == ["server"] for line in lines if line.strip())


async def test_unreachable_nats_url_fails_fast_naming_it(
        home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("NATS_URL", url)

    rc, checks = await doctor_json(capsys)  # a reconnect loop would hang here

    assert rc == 1
    nats = only(checks, "nats")
    assert nats["status"] == "FAIL" and f"cannot reach {url}" in nats["detail"]
    assert "NATS_URL" in nats["fix"]
    assert "server" not in checks


async def test_server_nobody_provisioned_fails_on_missing_streams(
        nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)

    rc, checks = await doctor_json(capsys)

    assert rc == 1
    for s in STREAMS:
        check = only(checks, f"stream {s}")
        assert check["status"] == "FAIL" and "corral up" in check["fix"]
    assert only(checks, "kv")["status"] == "FAIL"
    assert not [name for name in checks if name.startswith("consumer ")]


async def test_bad_fleet_file_fails_naming_file_table_and_key(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text(DEMO_CONFIG.read_text().replace("ack_wait_s = 10.0", "ack_wait_s = -1"))

    rc, checks = await doctor_json(capsys, config=bad)

    assert rc == 1
    fleet = only(checks, "fleet")
    assert fleet["status"] == "FAIL"
    assert str(bad) in fleet["detail"]
    assert "[runtime]" in fleet["detail"] and "ack_wait_s" in fleet["detail"]
    assert str(bad) in fleet["fix"] and "ack_wait_s" in fleet["fix"]
    assert "tools" not in checks  # nothing to import from a fleet that did not load


async def test_work_waiting_with_nobody_pulling_warns_naming_the_agent(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    await provision_fleet(bus, demo_fleet())
    await bus.js_publish(subjects.task("billing"), b'{"any": "task"}')

    rc, checks = await doctor_json(capsys)

    assert rc == 0  # a warning, not a failure: the task waits, it is not lost
    billing = only(checks, "consumer agent_billing")
    assert billing["status"] == "warn"
    assert "pending 1" in billing["detail"]
    assert "nobody serves agent billing" in billing["detail"]
    assert "corral ps" in billing["fix"]
    assert only(checks, "consumer agent_triage")["status"] == "ok"


async def test_dead_letters_warn_per_subject_with_the_last_reason(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    await provision_fleet(bus, demo_fleet())
    for reason in ("first", "invalid message on corral.tasks.triage"):
        letter = {"actor": "agent.triage", "subject": subjects.task("triage"), "reason": reason,
                  "payload": "{}"}
        await bus.js_publish(subjects.dlq("agent.triage"), json.dumps(letter).encode())
    await bus.js_publish(subjects.dlq("tool.send_email"), b"[[[[ not a letter")

    rc, checks = await doctor_json(capsys)

    assert rc == 0
    letters = {c["detail"].split(" on ")[1].split(",")[0]: c for c in checks["dead letters"]}
    triage = letters[subjects.dlq("agent.triage")]
    assert triage["status"] == "warn"
    assert triage["detail"].startswith("2 on ")
    assert triage["detail"].endswith("last: invalid message on corral.tasks.triage")
    assert "docs/operator.md#dead-letters" in triage["fix"]
    assert "not a dead letter" in letters[subjects.dlq("tool.send_email")]["detail"]


def test_credentials_readable_by_others_fail_with_chmod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "corral.creds"
    creds.write_text("secret")
    creds.chmod(0o644)
    monkeypatch.setenv("CORRAL_CREDS", str(creds))

    [check] = credentials_checks(anonymous=True)
    assert check.status == "FAIL" and f"chmod 600 {creds}" in check.fix

    creds.chmod(0o600)
    [check] = credentials_checks(anonymous=True)
    assert check.status == "ok"

    monkeypatch.setenv("CORRAL_CREDS", str(tmp_path / "missing.creds"))
    [check] = credentials_checks(anonymous=True)
    assert check.status == "FAIL" and "missing.creds" in check.detail
