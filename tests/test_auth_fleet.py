"""Authentication on by default (issue 8): `corral up` and the CLI with one identity per process.

`corral up` without NATS_URL generates keys under $CORRAL_HOME, starts its
server with them, and gives each process its own credential; every command
keeps working with no extra step. Against your own server, `corral
nats-config` writes the files and CORRAL_CREDS_DIR hands them out; without
any, `corral up` says it runs unauthenticated.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from actors.runtime import load_fleet
from bus.auth import creds_path, embedded_auth_dir, load_creds
from bus.permissions import fleet_identities
from bus.server import EmbeddedServer
from corral.demo_run import DEMO_TASKS
from schemas.config import supervision_tree
from tests.conftest import DEMO_CONFIG
from tests.supervision_helpers import (
    DEFAULT_TREE,
    corral,
    env_without_nats,
    finish,
    process_environs,
    start_up,
    stop,
    tree_config,
)

IDENTITIES = len(fleet_identities(load_fleet(DEMO_CONFIG)))  # 16: 3 agents, 4 tool actors
# (3 tools, 1 MCP server), 1 alias, 4 supervisors (root and one per domain), 4 roles


def violations(home: Path) -> list[str]:
    """Lines of every log (actors, supervisors, the server) that report a refused operation."""
    logs = [*(home / "logs").glob("*.log"), home / "nats" / "nats.log"]
    return [f"{p.name}: {line}" for p in logs if p.exists()
            for line in p.read_text(errors="replace").splitlines()
            if "violation" in line.lower()]


def test_corral_up_runs_the_demo_with_one_identity_per_process(home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE)
    env = env_without_nats(home)
    up, printed = start_up(env, "--config", str(config))
    creds_dir = embedded_auth_dir(home) / "creds"
    try:
        assert f"auth      one nkey identity per process, credentials in {creds_dir}" in \
            "".join(printed)
        for agent, text in DEMO_TASKS:
            done = corral(env, "submit", agent, text, "--wait")
            assert done.returncode == 0, done.stdout + done.stderr
        # Cancel a task before it is submitted (deterministic: it never starts).
        canceled = corral(env, "cancel", "t-auth-cancel", "--reason", "testing")
        assert canceled.returncode == 0, canceled.stdout + canceled.stderr
        late = corral(env, "submit", "triage", "Where is order 5678?", "--id", "t-auth-cancel",
                      "--wait", "--timeout", "20")
        assert late.returncode == 1 and "canceled" in late.stderr, late.stdout + late.stderr
        events = corral(env, "events", "--json")
        assert events.returncode == 0, events.stderr
        kinds = [json.loads(line)["type"] for line in events.stdout.splitlines()]
        assert kinds.count("task.completed") == len(DEMO_TASKS)
        assert corral(env, "events", "--system").returncode == 0
        ps = corral(env, "ps", "--json")
        assert ps.returncode == 0, ps.stderr
        seen = process_environs(ps.stdout)
        rest = stop(up)
        assert up.returncode == 0, rest
    finally:
        finish(up)
    # Each process holds exactly its own credential; a supervisor also the directory it hands
    # its children theirs from. Nobody else's, and no seed in any environment.
    tree = supervision_tree(load_fleet(config))
    assert len(seen) == len(tree.domains()) + sum(  # every domain and every actor replica
        c.replicas for d in tree.domains() for c in tree.spec(d).children)
    seeds = [load_creds(p).seed.decode() for p in creds_dir.glob("*.creds")]
    assert len(seeds) == len(fleet_identities(load_fleet(config))), len(seeds)  # (no secrets)
    for child, env_of in seen.items():
        identity = child.rsplit(".", 1)[0] if child.count(".") >= 2 else f"supervisor.{child}"
        creds = {k: v for k, v in env_of.items() if k.startswith("CORRAL_CREDS")}
        expected = {"CORRAL_CREDS": str(creds_path(creds_dir, identity))}
        if identity.startswith("supervisor."):
            expected["CORRAL_CREDS_DIR"] = str(creds_dir)
        assert creds == expected, child
        assert not any(s in v for v in env_of.values() for s in seeds), child
    assert violations(home) == []
    # Keys never reach a log, the events, `corral ps` or the terminal.
    texts = {"corral up": "".join(printed) + rest, "corral ps": ps.stdout,
             "events": events.stdout,
             **{p.name: p.read_text(errors="replace") for p in (home / "logs").glob("*.log")},
             "nats.log": (home / "nats" / "nats.log").read_text(errors="replace")}
    for name, text in texts.items():
        assert not any(s in text for s in seeds), f"a seed in {name}"


def test_nats_config_writes_private_files_and_keeps_keys(home: Path) -> None:
    out = home / "auth"
    env = env_without_nats(home)
    first = corral(env, "nats-config", "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{IDENTITIES} identities ({IDENTITIES} new keys, 0 kept)" in first.stdout
    assert "include" in first.stdout and "CORRAL_CREDS_DIR" in first.stdout
    creds = sorted((out / "creds").glob("*.creds"))
    assert len(creds) == IDENTITIES
    assert {"client.creds", "auditor.creds", "operator.creds", "admin.creds"} <= {
        p.name for p in creds}
    assert stat.S_IMODE((out / "creds").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in creds)
    assert (out / "auth.conf").read_text().count("nkey:") == IDENTITIES
    keys = (out / "keys.json").read_text()
    assert not any(load_creds(p).seed.decode() in keys for p in creds)  # public keys only

    before = {p.name: p.read_text() for p in creds}
    again = corral(env, "nats-config", "--out", str(out))
    assert f"(0 new keys, {IDENTITIES} kept)" in again.stdout, again.stdout
    assert {p.name: p.read_text() for p in creds} == before
    fresh = corral(env, "nats-config", "--out", str(out), "--new-keys")
    assert f"({IDENTITIES} new keys, 0 kept)" in fresh.stdout, fresh.stdout
    assert all(p.read_text() != before[p.name] for p in creds)

    (out / "creds" / "client.creds").chmod(0o644)  # a careless copy: said, not hidden
    loose = corral({**env, "CORRAL_CREDS": str(out / "creds" / "client.creds")},
                   "submit", "triage", "hi")
    assert "others can read its secret seed" in loose.stderr


def test_corral_up_against_your_own_server_with_creds_dir(home: Path, tmp_path: Path) -> None:
    """The README's steps: nats-config, a server that includes auth.conf, CORRAL_CREDS_DIR."""
    config = tree_config(home, DEFAULT_TREE)
    out = tmp_path / "nats-auth"
    env = env_without_nats(home)
    assert corral(env, "nats-config", "--config", str(config), "--out",
                  str(out)).returncode == 0
    server = EmbeddedServer(tmp_path / "theirs", auth=out / "auth.conf")  # "your" server
    url = server.start()
    env = {**env, "NATS_URL": url}
    up, printed = start_up({**env, "CORRAL_CREDS_DIR": str(out / "creds")},
                           "--config", str(config))
    try:
        assert "unauthenticated" not in "".join(printed)
        client = str(out / "creds" / "client.creds")
        done = corral(env, "--creds", client, "submit", "triage", "Where is order 5678?",
                      "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        anonymous = corral(env, "ps")
        assert anonymous.returncode == 1
        assert "refused an anonymous connection" in anonymous.stderr, anonymous.stderr
        wrong = corral({**env, "CORRAL_CREDS": client}, "ps")  # a client may not read liveness
        assert wrong.returncode == 1, wrong.stdout
        ps = corral({**env, "CORRAL_CREDS_DIR": str(out / "creds")}, "ps")
        assert ps.returncode == 0 and "agent.triage.0" in ps.stdout, ps.stdout + ps.stderr
        stop(up)
    finally:
        finish(up)
        server.stop()


def test_corral_up_against_an_unauthenticated_server_says_so(home: Path, tmp_path: Path) -> None:
    config = tree_config(home, DEFAULT_TREE)
    server = EmbeddedServer(tmp_path / "open")
    env = {**env_without_nats(home), "NATS_URL": server.start()}
    up, printed = start_up(env, "--config", str(config))
    try:
        text = "".join(printed)
        assert "unauthenticated" in text and "anyone who can reach it" in text, text
        assert "auth      NONE" in text
        done = corral(env, "submit", "triage", "Where is order 5678?", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        stop(up)
    finally:
        finish(up)
        server.stop()
