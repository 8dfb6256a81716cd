"""App allow-list: the hash covers exactly the shipped source, and refusals name both hashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from client.allowlist import app_refusal, code_files, code_hash, current_app_hash, loaded_code_root


def _tree(root: Path) -> Path:
    for rel, text in {
        "client/app.py": "x = 1\n",
        "client/sub/mod.py": "y = 2\n",
        "common/a.py": "",
        "common/demo/hospitals.py": "not shipped: the demo generator stays out of the app bundle\n",
        "protocols/p.py": "",
        "server/s.py": "",
        "pyproject.toml": "[project]\n",
        "tests/test_x.py": "not shipped\n",
        "README.md": "not shipped\n",
        "client/__pycache__/app.cpython-311.pyc": "bytecode",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_hash_covers_shipped_source_only(tmp_path: Path) -> None:
    root = _tree(tmp_path / "a")
    names = [p.as_posix() for p in code_files(root)]
    assert names == [
        "client/app.py",
        "client/sub/mod.py",
        "common/a.py",
        "protocols/p.py",
        "pyproject.toml",
        "server/s.py",
    ]
    before = code_hash(root)
    (root / "tests" / "test_x.py").write_text("changed\n", encoding="utf-8")
    (root / "README.md").write_text("changed\n", encoding="utf-8")
    (root / "common" / "demo" / "hospitals.py").write_text("changed\n", encoding="utf-8")
    assert code_hash(root) == before
    (root / "client" / "app.py").write_text("x = 2\n", encoding="utf-8")
    assert code_hash(root) != before


def test_hash_is_location_independent_and_sees_renames(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert code_hash(a) == code_hash(b)
    (b / "common" / "a.py").rename(b / "common" / "b.py")
    assert code_hash(a) != code_hash(b)


def test_current_hash_is_the_loaded_tree() -> None:
    assert current_app_hash() == code_hash(loaded_code_root())
    assert (loaded_code_root() / "client" / "allowlist.py").exists()


def test_refusal_names_the_hash_and_the_allowed_ones() -> None:
    got, ok = "1" * 64, "2" * 64
    assert app_refusal(got, ()) is None  # not pinned
    assert app_refusal(ok, (ok,)) is None
    reason = app_refusal(got, (ok,))
    assert reason is not None and got in reason and ok in reason


def test_pyproject_layout_and_comments_do_not_change_the_hash(tmp_path: Path) -> None:
    root = _tree(tmp_path / "a")
    (root / "pyproject.toml").write_text(
        '[project]\nname = "x"  # comment\ndeps = ["a", "b"]\n', encoding="utf-8"
    )
    before = code_hash(root)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndeps = [\n    "a",\n    "b",\n]\n', encoding="utf-8"
    )
    assert code_hash(root) == before  # what `flwr build` does to the file
    (root / "pyproject.toml").write_text('[project]\nname = "y"\ndeps = ["a", "b"]\n', encoding="utf-8")
    assert code_hash(root) != before


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flwr's own use of pathspec
def test_the_hash_covers_exactly_what_flower_puts_in_the_app_bundle() -> None:
    """``flwr build`` (fab-include in pyproject.toml) and ``code_files`` must agree, or a site
    that pinned a checkout's hash would refuse the very code it reviewed."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    root = Path(__file__).resolve().parents[1]
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(root)))
    shipped = sorted(n for n in fab.namelist() if not n.startswith(".info/"))
    assert shipped == [p.as_posix() for p in code_files(root)]
    assert not [n for n in shipped if n.startswith("common/demo/")]
