"""``sarcofed site evaluate | compare | train`` options (``client.tasks_cli``)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from server.cli import app


def test_an_unknown_role_is_a_usage_error_that_lists_the_choices(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["site", "evaluate", str(tmp_path), "--model", str(tmp_path / "model.pt"), "--role", "bogus"]
    )
    assert result.exit_code == 2, result.output  # refused by the option itself, before anything runs
    text = " ".join(result.output.split())
    assert all(choice in text for choice in ("auto", "internal", "external"))
