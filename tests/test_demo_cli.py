"""``sarcofed demo make``: the options accept exactly what a demo study accepts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from protocols.study import DemoSection
from server.cli import app


def test_demo_make_refuses_fewer_slices_than_a_demo_study_accepts(tmp_path: Path) -> None:
    fewest = DemoSection.model_fields["slices"].metadata[0].ge
    args = ["demo", "make", str(tmp_path / "demo"), "--sites", "1", "--size", "32", "--json"]
    result = CliRunner().invoke(app, [*args, "--slices", str(fewest - 1)])
    assert result.exit_code == 2, result.output  # a usage error, before anything is written
    assert not (tmp_path / "demo").exists()
