"""Dependencies point one way: protocols <- common <- client/server; common never imports flwr.

``server`` may import ``client`` only in its composition root (``server/cli.py`` builds the
one ``sarcofed`` command); screen rendering (rich, typer) lives with the CLIs, not in ``common``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "protocols": {"common", "client", "server", "flwr", "torch", "numpy"},
    "common": {"client", "server", "flwr", "rich", "typer"},
    "client": {"server"},
    "server": {"client"},
}
#: The one module allowed to break a rule above: it assembles the CLI from both sides.
COMPOSITION_ROOT = ROOT / "server" / "cli.py"


#: Our packages, in the order their dependencies point.
OUR_PACKAGES = ("protocols", "common", "client", "server")


def _module_name(path: Path) -> str:
    """``client/workbench/api.py`` -> ``client.workbench.api`` (a package's ``__init__`` -> the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The top-level packages the import statements of one of our files name (lazy and relative
    imports included: see :func:`_imported_modules`)."""
    return {name.split(".")[0] for name in _imported_modules(_module_name(path), path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & FORBIDDEN[package] and path != COMPOSITION_ROOT
    }
    assert offenders == {}


def test_the_composition_root_is_the_only_exception_and_needs_it() -> None:
    """If server/cli.py stopped importing client, the exception would hide nothing and should go."""
    assert "client" in _imports(COMPOSITION_ROOT)


def test_the_check_sees_imports() -> None:
    """The checker itself must find a real import, or the test above proves nothing."""
    assert "flwr" in _imports(ROOT / "client" / "app.py")
    # relative imports too: segment.py names its own package only as ``from .state import``
    assert "client" in _imports(ROOT / "client" / "workbench" / "segment.py")


def test_the_clientapp_module_loads_without_torch() -> None:
    """Each message on the deployment engine is a fresh process importing ``client.app``;
    identify and compare need no model, so torch and the model zoo must load lazily."""
    import subprocess
    import sys

    heavy = "('torch', 'segmentation_models_pytorch')"
    code = f"import sys, client.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _module_file(module: str) -> Path | None:
    """The source file of one of our modules (``None`` for anything else)."""
    if module.split(".")[0] not in OUR_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth (inside functions,
    ``if TYPE_CHECKING:`` blocks and ``try:`` included), with ``from X import Y`` counted as
    X and, where Y is a module, X.Y; relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found |= {f"{source}.{alias.name}" for alias in node.names}
    return found


def reachable(start: str) -> set[str]:
    """Our modules that importing ``start`` can load, now or later (lazy imports included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            name = ".".join(parts[:depth])
            path = _module_file(name)
            if path is None or name in seen:
                continue
            seen.add(name)
            todo.extend(_imported_modules(name, path))
    return seen


def test_the_walk_finds_lazy_imports_inside_functions() -> None:
    """The walk must see an import inside a function, or the test below proves nothing:
    ``client.app`` imports ``common.model`` only inside its handlers."""
    assert "common.model" in reachable("client.app")
    assert "common.demo.hospitals" in reachable("client.demo_cli")  # lazy, inside 'make'


@pytest.mark.parametrize("start", ["client.app", "server.app"])
def test_the_flower_apps_never_reach_the_demo_generator(start: str) -> None:
    """The ClientApp (a hospital's app bundle) and the ServerApp run from the FAB, which
    leaves ``common/demo`` out (fab-include in pyproject.toml): no import path, not even a
    lazy one, may lead there."""
    demo = sorted(m for m in reachable(start) if m == "common.demo" or m.startswith("common.demo."))
    assert demo == [], f"{start} can import {demo}"


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A module the packages import must be installed by ``pip install .`` itself, not by luck
    (httpx, cryptography, starlette and timm once were only test extras or transitive)."""
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {
        re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")
        for spec in project["dependencies"]
    }
    imported = set().union(*(_imports(p) for pkg in OUR_PACKAGES for p in (ROOT / pkg).rglob("*.py")))
    third_party = imported - set(OUR_PACKAGES) - set(sys.stdlib_module_names)
    owners = packages_distributions()
    undeclared = {
        module: owners.get(module, ["?"])
        for module in sorted(third_party)
        if not {d.lower().replace("_", "-") for d in owners.get(module, [])} & declared
    }
    assert undeclared == {}
