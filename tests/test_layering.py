"""Dependencies point one way: protocols <- common <- client/server; common never imports flwr."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "protocols": {"common", "client", "server", "flwr", "torch", "numpy"},
    "common": {"client", "server", "flwr"},
    "client": {"server"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_the_check_sees_imports() -> None:
    """The checker itself must find a real import, or the test above proves nothing."""
    assert "flwr" in _imports(ROOT / "client" / "app.py")


def test_the_clientapp_module_loads_without_torch() -> None:
    """Each message on the deployment engine is a fresh process importing ``client.app``;
    identify and compare need no model, so torch and the model zoo must load lazily."""
    import subprocess
    import sys

    heavy = "('torch', 'segmentation_models_pytorch')"
    code = f"import sys, client.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
