"""Diff two sets of results: ``python -m bench.compare [OLD.json] NEW.json``.

``python -m bench --compare`` runs the suite and calls this against the
committed ``bench/results.json``. Figures ending in ``_per_s`` or ``_ratio``
are better higher; ``_ms`` figures are better lower. A change smaller than
the run-to-run noise is called "same": 15% for figures that only cost CPU
(memory streams, the model round trip), 35% for those that wait on fsync.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.report import RESULTS, load_results

__all__ = ["compare", "format_compare", "main", "noise_pct"]

CPU_NOISE_PCT = 15.0
DISK_NOISE_PCT = 35.0
CPU_BOUND = ("_mem_", "model_request_")


def noise_pct(key: str) -> float:
    """How much ``key`` moves between two runs on an unchanged tree."""
    return CPU_NOISE_PCT if any(m in key for m in CPU_BOUND) else DISK_NOISE_PCT


def _higher_is_better(key: str) -> bool:
    return not key.endswith("_ms")


def compare(old: Mapping[str, float], new: Mapping[str, float]
            ) -> list[tuple[str, float | None, float | None, float | None, str]]:
    """Rows of (figure, old, new, % change, verdict) over both sets of keys."""
    rows: list[tuple[str, float | None, float | None, float | None, str]] = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            rows.append((key, a, b, None, "new" if a is None else "gone"))
            continue
        pct = (b - a) / a * 100 if a else None
        verdict = "same"
        if pct is not None and abs(pct) >= noise_pct(key):
            better = (pct > 0) == _higher_is_better(key)
            verdict = "better" if better else "WORSE"
        rows.append((key, a, b, pct, verdict))
    return rows


def format_compare(old: Mapping[str, float], new: Mapping[str, float]) -> str:
    """The comparison as an aligned text table."""
    rows = compare(old, new)
    width = max((len(r[0]) for r in rows), default=6)

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:,.2f}"

    lines = [f"{'figure':<{width}}  {'old':>12}  {'new':>12}  {'change':>8}  verdict"]
    for key, a, b, pct, verdict in rows:
        change = "-" if pct is None else f"{pct:+.1f}%"
        lines.append(f"{key:<{width}}  {num(a):>12}  {num(b):>12}  {change:>8}  {verdict}")
    lines.append(f"('same': within run-to-run noise, {CPU_NOISE_PCT:g}% for CPU-bound figures, "
                 f"{DISK_NOISE_PCT:g}% for fsync-bound ones)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compare two results files; exit 1 when either cannot be read."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="NEW, or OLD NEW (OLD defaults to bench/results.json)")
    args = parser.parse_args(argv)
    if len(args.files) > 2:
        parser.error("give NEW, or OLD NEW")
    old_path, new_path = (RESULTS, args.files[0]) if len(args.files) == 1 else args.files
    old, new = load_results(old_path), load_results(new_path)
    if not old or not new:
        print(f"cannot read results from {old_path if not old else new_path}", file=sys.stderr)
        return 1
    print(format_compare(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
