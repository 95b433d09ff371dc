"""The compose stack, checked offline: its files, its PromQL, its dashboards, its commands.

No Docker engine runs here. What can be checked without one is: compose.yaml
wires what docs/operating-at-scale.md says (a 3-node cluster syncing every
write, one `corral up --domain` per failure domain, scalable, credentials from
`corral nats-config`); every rule and panel parses as PromQL and names a
metric corral exports (promtool is not on PyPI or npm: promql-parser, the
Prometheus parser's Rust port, stands in); and the same commands, run as
processes against the same nats.conf, make a working fleet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from actors import metrics
from actors.runtime import REPLICAS_ENV, load_fleet
from bus.connection import nats_servers
from bus.server import find_nats_server, free_port
from corral import fleetgauges
from schemas.config import supervision_tree
from schemas.errors import ConfigError
from tests.conftest import DEMO_CONFIG, REPO
from tests.otlp_receiver import Receiver, Span, otlp_receiver
from tests.supervision_helpers import CORRAL, corral, env_without_nats, finish, stop
from tests.test_telemetry import check_tree

DEPLOY = REPO / "deploy"
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NATS_NODES = ["nats-1", "nats-2", "nats-3"]
DOMAINS = supervision_tree(load_fleet(DEMO_CONFIG)).domains()
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
assert metrics and fleetgauges  # imported for the metrics they define


def exported() -> set[str]:
    """Every series name a corral process serves (families as the exposition names them)."""
    names = {"up"}  # Prometheus's own, per target
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",)}
    for family in REGISTRY.collect():
        if family.name.startswith("corral_"):
            names |= {family.name + s for s in suffixes[family.type]}
    return names


def recorded() -> set[str]:
    """The names the recording rules define."""
    return {r["record"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(expr))
    return names


# -- compose.yaml ----------------------------------------------------------------------

def test_nats_is_a_three_node_cluster_that_syncs_every_write() -> None:
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert re.search(r"jetstream\s*\{[^}]*sync_interval:\s*always", conf)
    routes = re.findall(r"nats-route://([\w-]+):6222", conf)
    assert sorted(routes) == NATS_NODES
    assert 'include "auth/auth.conf"' in conf
    for node in NATS_NODES:
        svc = SERVICES[node]
        assert svc["environment"]["SERVER_NAME"] == node
        assert svc["configs"] == [{"source": "nats-conf", "target": "/etc/nats/nats.conf"}]
        assert "nats-auth:/etc/nats/auth:ro" in svc["volumes"]
        assert svc["depends_on"]["nats-config"]["condition"] == "service_completed_successfully"
    assert COMPOSE["configs"]["nats-conf"]["file"] == "./deploy/nats/nats.conf"
    # Each node keeps its own store.
    assert len({next(v for v in SERVICES[n]["volumes"] if v.endswith(":/data"))
                for n in NATS_NODES}) == 3


def test_one_scalable_service_per_failure_domain_with_r3_and_credentials() -> None:
    assert SERVICES["nats-config"]["command"][:2] == ["corral", "nats-config"]
    for domain in DOMAINS:
        svc = SERVICES[domain]
        assert svc["command"] == ["corral", "up", "--config", "config/demo.toml",
                                  "--domain", domain]
        env = svc["environment"]
        assert env["CORRAL_STREAM_REPLICAS"] == "3"
        assert sorted(u.split("//")[1].split(":")[0] for u in env["NATS_URL"].split(",")) \
            == NATS_NODES
        assert env["CORRAL_CREDS_DIR"].startswith("/etc/corral/nats-auth")
        # --scale: no fixed name, no host port, no $CORRAL_HOME shared between replicas.
        assert "container_name" not in svc and "ports" not in svc
        assert not any(":" + env["CORRAL_HOME"] in v for v in svc.get("volumes", []))
        assert all(svc["depends_on"][n]["condition"] == "service_healthy" for n in NATS_NODES)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_the_environment_sets_r3_and_a_clusters_seed_servers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REPLICAS_ENV, "3")
    assert load_fleet(DEMO_CONFIG).runtime.stream_replicas == 3
    monkeypatch.setenv(REPLICAS_ENV, "2")
    with pytest.raises(ConfigError, match="1, 3 or 5") as err:
        load_fleet(DEMO_CONFIG)
    assert err.value.key == REPLICAS_ENV
    url = SERVICES["agents"]["environment"]["NATS_URL"]
    assert nats_servers(url) == [f"nats://{n}:4222" for n in NATS_NODES]


def test_every_mounted_file_exists() -> None:
    mounts = [v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", [])
              if v.startswith("./")]
    assert mounts
    for m in mounts:
        assert (REPO / m).exists(), m


def test_prometheus_scrapes_every_domain_on_its_metrics_port() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "corral")
    (sd,) = job["dns_sd_configs"]
    assert sorted(sd["names"]) == sorted(DOMAINS)
    assert all(str(sd["port"]) == SERVICES[d]["environment"]["CORRAL_METRICS_PORT"]
               for d in DOMAINS)
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in SERVICES["prometheus"]["volumes"]
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


# -- rules and dashboards --------------------------------------------------------------

def test_rules_parse_and_name_only_metrics_corral_exports() -> None:
    known = exported() | recorded()
    alerts = 0
    for f in RULES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            assert group["name"] and group["rules"], f
            for rule in group["rules"]:
                assert ("record" in rule) != ("alert" in rule), rule
                if "record" in rule:
                    assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule
                else:
                    alerts += 1
                    assert rule["labels"]["severity"] in ("page", "ticket"), rule
                    assert rule["annotations"]["summary"], rule
                    if "for" in rule:
                        promql_parser.parse_duration(rule["for"])
                unknown = metric_names(rule["expr"]) - known
                name = rule.get("record") or rule.get("alert")
                assert not unknown, f"{f.name}: {name}: {unknown}"
    assert alerts >= 4  # success burn, latency, budget burn, approval SLA


def test_a_typo_in_a_metric_name_is_caught() -> None:
    # The check above is only worth something if it can fail.
    assert metric_names("sum(rate(corral_task_total[5m]))") - exported() == {"corral_task_total"}
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(corral_tasks_total[5m])")


def test_dashboards_load_and_every_panel_queries_a_metric_corral_exports() -> None:
    assert {d.stem for d in DASHBOARDS} == {"corral-fleet", "corral-tasks"}
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    known = exported() | recorded()
    queried: set[str] = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels and len({p["id"] for p in board["panels"]}) == len(board["panels"])
        for panel in panels:
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                names = metric_names(target["expr"])
                assert names and not names - known, (panel["title"], names - known)
                queried |= names
    # What the issue asks the dashboards to show.
    for metric in ("corral_tasks_total", "corral_task_duration_seconds_bucket",
                   "corral_turn_duration_seconds_bucket",
                   "corral_tool_call_duration_seconds_bucket",
                   "corral_model_cost_usd_total", "corral_team_budget_usd_per_day",
                   "corral_breaker_state", "corral_dead_letters_total",
                   "corral_approvals_waiting", "up"):
        assert metric in queried, metric
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in SERVICES["grafana"]["volumes"]


# -- the same services, as processes ---------------------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """`corral nats-config`, then deploy/nats/nats.conf as three nodes on loopback.

    The file is the compose one with only the addresses and the store moved:
    the nodes' names, routes and ports become local ones.
    """
    out = tmp_path / "auth"  # where the unchanged include "auth/auth.conf" finds it
    done = corral(env_without_nats(tmp_path), "nats-config", "--config", str(DEMO_CONFIG),
                  "--out", str(out))
    assert done.returncode == 0, done.stderr
    ports = {n: (free_port(), free_port(), free_port()) for n in NATS_NODES}
    text = (DEPLOY / "nats" / "nats.conf").read_text()
    procs: list[subprocess.Popen[bytes]] = []
    for node, (client, route, http) in ports.items():
        conf = text.replace('"0.0.0.0:4222"', f'"127.0.0.1:{client}"')
        conf = conf.replace('"0.0.0.0:8222"', f'"127.0.0.1:{http}"')
        conf = conf.replace('"0.0.0.0:6222"', f'"127.0.0.1:{route}"')
        conf = conf.replace('"/data"', f'"{tmp_path / node}"')
        for other, (_, other_route, _) in ports.items():
            conf = conf.replace(f"nats-route://{other}:6222", f"nats-route://127.0.0.1:{other_route}")
        path = tmp_path / f"{node}.conf"
        path.write_text(conf)
        procs.append(subprocess.Popen([find_nats_server(), "-c", str(path)],
                                      env={**os.environ, "SERVER_NAME": node},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    urls = [f"nats://127.0.0.1:{c}" for c, _, _ in ports.values()]
    for _, _, http in ports.values():  # what compose's health check waits for
        deadline = time.monotonic() + 30
        while not healthy(http):
            assert all(p.poll() is None for p in procs), "a NATS node exited"
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.2)
    try:
        yield urls, {"CORRAL_CREDS_DIR": str(out / "creds")}, out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample `corral up` serves: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family is served twice"
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def ready(up: subprocess.Popen[str]) -> str:
    """Read `corral up`'s output until it says ready; "" if so, else what it said."""
    assert up.stdout is not None
    lines: list[str] = []
    for line in up.stdout:
        lines.append(line)
        if "ready" in line:
            return ""
    up.wait()
    return "".join(lines)


def start_domains(domains: list[str], base: dict[str, str], tmp_path: Path,
                  ups: list[subprocess.Popen[str]], ports: list[tuple[str, int]]) -> None:
    """`corral up --domain` per domain, each its own "container" ($CORRAL_HOME, metrics port).

    Started together, as compose starts them; one that exits before it is ready
    (provisioning R3 streams on a busy cluster can time out) is started again,
    as ``restart: unless-stopped`` would, at most twice. Fills ``ups`` and
    ``ports`` (the domain and its metrics port) as it goes, for the caller to stop.
    """

    def start(i: int, domain: str) -> subprocess.Popen[str]:
        env = {**base, "CORRAL_HOME": str(tmp_path / f"home-{i}"),
               "CORRAL_METRICS_PORT": str(ports[i][1])}
        return subprocess.Popen([*CORRAL, "up", "--config", str(DEMO_CONFIG), "--domain", domain],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    for i, domain in enumerate(domains):
        (tmp_path / f"home-{i}").mkdir()
        ports.append((domain, free_port()))
        ups.append(start(i, domain))
    for i, domain in enumerate(domains):
        for _ in range(2):
            said = ready(ups[i])
            if not said:
                break
            print(f"corral up --domain {domain} exited before ready; restarted:\n{said}")
            finish(ups[i])
            ups[i] = start(i, domain)
        else:
            said = ready(ups[i])
            assert not said, said


def healthy(port: int) -> bool:
    """Whether a node's /healthz says OK (JetStream included: a meta leader is elected)."""
    try:
        return bool(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                           timeout=2).status == 200)
    except OSError:
        return False


def test_the_compose_commands_run_as_processes_and_one_task_is_one_trace(
        tmp_path: Path, cluster: tuple[list[str], dict[str, str], Path]) -> None:
    """nats-config, the cluster, `corral up --domain` per domain (agents twice), a task.

    The collector is an OTLP receiver in the test, Prometheus a scrape of each
    domain: the task is one trace across the processes, and the histograms move.
    """
    urls, creds, out = cluster
    with otlp_receiver() as rx:
        base = {**os.environ, **creds, "NATS_URL": ",".join(urls), "CORRAL_STREAM_REPLICAS": "3",
                "OTEL_EXPORTER_OTLP_ENDPOINT": rx.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        base.pop("CORRAL_FAULTS", None)
        ups: list[subprocess.Popen[str]] = []
        ports: list[tuple[str, int]] = []
        try:
            start_domains([*DOMAINS, "agents"], base, tmp_path, ups, ports)  # agents: 2 replicas
            before = {p: scrape(p) for _, p in ports}
            client_env = {**env_without_nats(tmp_path), "NATS_URL": ",".join(urls)}
            done = corral(client_env, "--creds", str(out / "creds" / "client.creds"), "submit",
                          "triage", "Where is order 5678?", "--id", "compose-1", "--wait",
                          "--timeout", "60", timeout=90)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "in transit" in done.stdout
            spans = exported_trace(rx, "compose-1")
            after = {p: scrape(p) for _, p in ports}
        finally:
            for up in ups:
                up.terminate()
            for up in ups:
                stop(up)
                finish(up)
    task, turns = check_tree(spans, "compose-1", "triage")
    assert task.attributes["corral.task.outcome"] == "completed"
    assert {"corral-agent-triage", "corral-model-support-model",
            "corral-tool-lookup_order"} <= {s.service for s in spans}  # one trace, many processes

    def moved(domain: str, name: str, **labels: str) -> float:
        return sum(total(after[p], name, **labels) - total(before[p], name, **labels)
                   for d, p in ports if d == domain)

    # Whichever agents replica ended it counted it.
    assert moved("agents", "corral_tasks_total", agent="triage", outcome="completed") == 1
    assert moved("agents", "corral_task_duration_seconds_count", agent="triage",
                 outcome="completed") == 1
    assert moved("agents", "corral_task_duration_seconds_sum", agent="triage") > 0
    assert moved("agents", "corral_task_cost_usd_count", agent="triage", outcome="completed") == 1
    assert moved("agents", "corral_turn_duration_seconds_count") == len(turns)
    # Cumulative buckets end in +Inf = count.
    assert moved("agents", "corral_turn_duration_seconds_bucket", le="+Inf") == len(turns)
    assert moved("models", "corral_model_call_duration_seconds_count",
                 alias="support-model") == len(turns)
    assert moved("tools", "corral_tool_call_duration_seconds_count", tool="lookup_order",
                 outcome="completed") == 1
    assert total(after[ports[0][1]], "corral_team_budget_usd_per_day") >= 0
    assert any(n == "corral_backlog" for n, _ in after[ports[-1][1]])  # fleet gauges


def exported_trace(rx: Receiver, task_id: str) -> list[Span]:
    """The task's spans, once every process has exported its part (each in its own batches)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = rx.of_task(task_id)
        turns = sum(s.name.startswith("turn ") for s in got)
        if (any(s.name.startswith("invoke_agent") for s in got) and turns
                and sum(s.name.startswith("chat ") for s in got) >= turns
                and any(s.name.startswith("execute_tool ") for s in got)):
            break
        time.sleep(0.1)
    return rx.of_task(task_id)
