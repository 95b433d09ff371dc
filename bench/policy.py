"""Benchmark: the cost of the policy check per tool call (``Gate.decide``), in microseconds.

No NATS: the gate is pure, and runs once per tool call (and handoff) in the
agent, before dispatch. The fleet is ``config/demo.toml`` with the demo's
policy (``config/policies/demo.cedar``: six policies) and the tool schemas
derived from the demo's callables, as ``corral policy test`` builds it.

Set-ups, each timed call by call after a warm-up:

- *no policy*: the fleet as it is (no ``[policy]`` table, tier 1): today's
  behaviour, no Cedar call;
- *allow* / *approve*: a $10 refund and a $42.50 refund under the demo policy
  (one Cedar evaluation: arguments typed, request validated against the
  schema, decision);
- *with a shadow set*: the same policy again as the shadow set (two evaluations);
- *tier 3*: billing at tier 3 (the files' evaluation, then the generated tier
  policies);
- *refused input*: a NaN amount, denied before Cedar.

Run it alone with ``python -m bench.policy [--quick]`` (prints a table), or
call ``run()`` (returns flat figures).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Figure, percentile
from bench.report import format_table
from corral.policy_cli import tool_schemas
from schemas.config import parse_fleet
from schemas.policy import Gate, PolicySource

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.toml"
POLICY = ROOT / "config" / "policies" / "demo.cedar"

SMALL = {"order_id": "4242", "amount_usd": 10.0}
BIG = {"order_id": "1234", "amount_usd": 42.5}

LAYOUT: dict[str, tuple[str, str]] = {
    "policy_decide_open_p50_us": ("decide, no policy configured, p50", "today's behaviour"),
    "policy_decide_allow_p50_us": ("decide, demo policy, allow, p50", "one Cedar evaluation"),
    "policy_decide_allow_p99_us": ("decide, demo policy, allow, p99", ""),
    "policy_decide_approve_p50_us": ("decide, demo policy, approve, p50", ""),
    "policy_decide_shadow_p50_us": ("decide with a shadow set, p50", "two evaluations"),
    "policy_decide_tier3_p50_us": ("decide, tier 3 agent, p50", "files + tier policies"),
    "policy_decide_refused_p50_us": ("decide, NaN argument refused, p50", "before Cedar"),
}


def _time(call: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        samples.append((clock() - t0) / 1000)
    return samples


def run(calls: int = 20_000, warmup: int = 1_000) -> dict[str, float]:
    """Every figure of this benchmark (µs per ``decide``, gate build in ms)."""
    text = DEMO.read_text()
    fleet = parse_fleet(text, str(DEMO))
    params = tool_schemas(fleet)
    policy = [PolicySource(name="demo.cedar", path=str(POLICY), text=POLICY.read_text())]
    t0 = time.perf_counter()
    builds = 20
    for _ in range(builds):
        gate = Gate(fleet, live=policy, parameters=params)
    build_ms = (time.perf_counter() - t0) / builds * 1000
    open_gate = Gate(fleet, parameters=params)
    shadow_gate = Gate(fleet, live=policy, shadow=policy, parameters=params)
    tier3 = parse_fleet(text.replace('tools = ["lookup_order", "issue_refund", "send_email"]',
                                     'tools = ["lookup_order", "issue_refund", "send_email"]\n'
                                     'tier = 3\napprover = "billing-lead"'), str(DEMO))
    tier3_gate = Gate(tier3, live=policy, parameters=params)

    def decide(g: Gate, args: dict[str, Any]) -> Callable[[], Any]:
        return lambda: g.decide("billing", "v1", "issue_refund", args, "task-1", 0.25)

    checks = {
        "open": (decide(open_gate, SMALL), "allow"),
        "allow": (decide(gate, SMALL), "allow"),
        "approve": (decide(gate, BIG), "approve"),
        "shadow": (decide(shadow_gate, SMALL), "allow"),
        "tier3": (decide(tier3_gate, SMALL), "approve"),
        "refused": (decide(gate, {"order_id": "1", "amount_usd": float("nan")}), "deny"),
    }
    results: dict[str, float] = {"policy_gate_build_ms": build_ms}
    for name, (call, expected) in checks.items():
        effect = call().effect
        assert effect == expected, f"{name}: {effect}, expected {expected}"  # measure the path
        samples = _time(call, calls, warmup)
        results[f"policy_decide_{name}_p50_us"] = percentile(samples, 50)
        if name == "allow":
            results["policy_decide_allow_p99_us"] = percentile(samples, 99)
    return results


def figures(results: dict[str, float]) -> list[Figure]:
    """The table rows (µs per call; the build in ms)."""
    rows = [Figure(k, label, results[k], "µs", note)
            for k, (label, note) in LAYOUT.items() if k in results]
    if "policy_gate_build_ms" in results:
        rows.append(Figure("policy_gate_build_ms", "build the gate (parse, validate)",
                           results["policy_gate_build_ms"], "ms", "once per fleet"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the calls")
    args = parser.parse_args(argv)
    calls = 4_000 if args.quick else 20_000
    print(format_table(figures(run(calls=calls, warmup=calls // 20))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
