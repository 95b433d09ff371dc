"""The architecture's import rules, checked on the source (imports only go down)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ["schemas", "bus", "actors", "supervisors", "corral"]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_imports_only_go_down(package: str) -> None:
    above = set(LAYERS[LAYERS.index(package) + 1:])
    for path in sources(package):
        wrong = imports(path) & above
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong} (a higher layer)"


def test_only_bus_talks_to_nats() -> None:
    for package in LAYERS:
        if package == "bus":
            continue
        for path in sources(package):
            assert "nats" not in imports(path), f"{path.relative_to(REPO)} imports nats"


def test_only_the_provider_adapters_import_the_sdks() -> None:
    for package in LAYERS:
        for path in sources(package):
            rel = path.relative_to(REPO).as_posix()
            for sdk in ("anthropic", "openai"):
                if sdk in imports(path):
                    assert rel == f"actors/providers/{sdk}_provider.py", f"{rel} imports {sdk}"
