"""`.ci/run` stops at the first failing check.

Under ``set -e`` bash ignores the failure of every command of an ``a && b`` list but the last,
so ``ruff check . && ruff format --check .`` let CI pass with ruff errors. The script keeps one
command a line; ``cmd || { ...; exit 1; }`` (an explicit exit) stays allowed.
"""

from __future__ import annotations

from pathlib import Path

CI_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_ci_script_chains_no_commands_with_and() -> None:
    offenders = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(CI_SCRIPT.read_text(encoding="utf-8").splitlines(), start=1)
        if "&&" in line.split("#", 1)[0]
    ]
    assert offenders == [], f".ci/run: put each command on its own line (set -e skips && lists): {offenders}"


def test_ci_script_exits_on_error() -> None:
    assert "set -euo pipefail" in CI_SCRIPT.read_text(encoding="utf-8")
