"""Supervision as data: the default tree, and errors that name file, table and key."""

from __future__ import annotations

import pytest

from schemas.config import parse_fleet, supervision_tree
from schemas.errors import ConfigError
from tests.conftest import DEMO_CONFIG

START, END = "# --- supervision", "# --- end supervision"


def without_supervision() -> str:
    text = DEMO_CONFIG.read_text()
    head, rest = text.split(START, 1)
    return head + rest.split(END, 1)[1].split("\n", 1)[1]


def with_tree(block: str) -> str:
    return without_supervision() + "\n" + block


def test_a_fleet_without_tables_gets_one_domain_per_kind() -> None:
    tree = supervision_tree(parse_fleet(without_supervision(), "f.toml"))
    assert tree.domains() == ["models", "tools", "agents"]
    # An MCP server is one tool actor ([mcp.time]: tool.time), in the tools' domain.
    assert tree.actors_under("tools") == ["tool.lookup_order", "tool.issue_refund",
                                          "tool.send_email", "tool.time"]
    assert all(tree.spec(d).strategy == "one_for_one" for d in tree.domains())
    assert tree.spec("agents").path == "root/agents"
    # Default shutdown: grace + 5 per actor; a supervisor gets its children's sum + 5.
    assert tree.spec("agents").children[0].shutdown_s == 15.0
    assert tree.root.children[2].shutdown_s == 50.0


def test_the_demo_file_spells_out_the_default_tree() -> None:
    demo = supervision_tree(parse_fleet(DEMO_CONFIG.read_text(), "demo.toml"))
    default = supervision_tree(parse_fleet(without_supervision(), "demo.toml"))
    assert demo == default


def test_nested_supervisors_replicas_and_root_children_default() -> None:
    fleet = parse_fleet(with_tree("""
[supervisors.backend]
strategy = "rest_for_one"
children = ["model.support-model", "toolbox"]
[supervisors.toolbox]
strategy = "one_for_all"
children = ["tool.lookup_order", "tool.issue_refund", "tool.send_email", "tool.time"]
[supervisors.front]
children = ["agent.triage", { actor = "agent.billing", replicas = 3, restart = "transient" },
            "agent.support"]
"""), "f.toml")
    tree = supervision_tree(fleet)
    assert tree.domains() == ["backend", "front"]  # toolbox is nested, not a domain
    assert tree.spec("toolbox").path == "root/backend/toolbox"
    billing = tree.spec("front").children[1]
    assert (billing.replicas, billing.restart) == (3, "transient")


@pytest.mark.parametrize(("block", "table", "key", "words"), [
    ('[supervisors.a]\nchildren = ["agent.nobody"]', "supervisors.a", "children",
     "unknown actor"),
    ('[supervisors.a]\nchildren = ["agent.triage", "agent.triage"]', "supervisors.a",
     "children", "already supervised"),
    ('[supervisors.a]\nchildren = ["agent.triage"]', "supervision", "children",
     "is not supervised"),
    ('[supervision]\nchildren = ["ghost"]', "supervision", "children", "unknown supervisor"),
    ('[supervisors.a]\nchildren = ["b"]\n[supervisors.b]\nchildren = ["a"]\n'
     '[supervision]\nchildren = ["a"]', "supervisors.b", "children", "supervise itself"),
    ('[supervisors.a]\nstrategy = "all_for_one"\nchildren = ["agent.triage"]',
     "supervisors.a", "strategy", "Invalid enum value"),
    ('[supervisors.a]\nwithin_s = 0\nchildren = ["agent.triage"]', "supervisors.a",
     "within_s", "positive"),
    ('[supervisors.a]\nbackoff = { min_s = 5, max_s = 1 }\nchildren = ["agent.triage"]',
     "supervisors.a.backoff", "max_s", "at least min_s"),
    ('[supervisors.a]\nbackoff = { jitter = 2 }\nchildren = ["agent.triage"]',
     "supervisors.a.backoff", "jitter", "between 0 and 1"),
    ('[supervisors.a]\nrestarts = 3\nchildren = ["agent.triage"]', "supervisors.a",
     "restarts", "unknown field"),
    ('[supervision]\nheartbeat_s = 2\nheartbeat_timeout_s = 3', "supervision",
     "heartbeat_timeout_s", "twice"),
    ('[supervisors.a]\nchildren = [{ supervisor = "b", replicas = 2 }]\n'
     '[supervisors.b]\nchildren = ["agent.triage"]', "supervisors.a", "children",
     "replicas is for actors"),
    ('[supervisors.a]\nchildren = [{ actor = "agent.triage", restart = "sometimes" }]',
     "supervisors.a.children[0]", "restart", "Invalid enum value"),
    ('[supervisors.root]\nchildren = ["agent.triage"]', "supervisors.root", "", "not be 'root'"),
])
def test_mistakes_name_the_file_table_and_key(block: str, table: str, key: str,
                                              words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet(with_tree(block), "fleet.toml")
    assert err.value.file == "fleet.toml"
    assert (err.value.table, err.value.key) == (table, key), str(err.value)
    assert words in str(err.value)
