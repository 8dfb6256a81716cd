"""Site release policy: policy.toml parsing, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import DEFAULT_MIN_SLICES, SitePolicy, load_policy, write_policy
from common.errors import SiteFolderError

HASH = "ab" * 32


def test_absent_policy_gives_documented_defaults(tmp_path: Path) -> None:
    policy = load_policy(tmp_path)
    assert policy.min_slices == DEFAULT_MIN_SLICES == 5
    assert policy.min_cell_count == 1
    assert policy.allow_polar_maps is True
    assert policy.allowed_apps == ()
    assert set(policy.accept_tasks) == {"train", "evaluate", "compare", "discrepancy"}
    assert policy.weights_dp.enabled is False


def test_kebab_case_keys_are_read(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(
        'accept-tasks = ["evaluate"]\nmin-slices = 8\nmin-cell-count = 3\nallow-polar-maps = false\n'
        f'allowed-apps = ["SHA256:{HASH.upper()}"]\n[weights-dp]\nenabled = true\nclipping-norm = 2.0\n',
        encoding="utf-8",
    )
    policy = load_policy(tmp_path)
    assert policy.accept_tasks == ("evaluate",)
    assert not policy.accepts("train")
    assert (policy.min_slices, policy.min_cell_count, policy.allow_polar_maps) == (8, 3, False)
    assert policy.allowed_apps == (HASH,)  # prefix dropped, lower-cased
    assert policy.weights_dp.enabled and policy.weights_dp.clipping_norm == 2.0


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("min-slice = 3\n", "min-slice"),  # typo: never silently a default
        ('accept-tasks = ["train", "export-slices"]\n', "accept-tasks"),
        ('allowed-apps = ["not-a-hash"]\n', "allowed-apps"),
        ("min-slices = 0\n", "min-slices"),
        ("min-slices = [\n", "cannot read"),
    ],
)
def test_invalid_policy_names_file_and_key(tmp_path: Path, text: str, names: str) -> None:
    (tmp_path / "policy.toml").write_text(text, encoding="utf-8")
    with pytest.raises(SiteFolderError) as info:
        load_policy(tmp_path)
    assert "policy.toml" in str(info.value)
    assert names in str(info.value)


def test_written_policy_reads_back_identically(tmp_path: Path) -> None:
    policy = SitePolicy(
        accept_tasks=("evaluate", "compare"), min_slices=7, min_cell_count=2, allowed_apps=(HASH,)
    )
    write_policy(tmp_path, policy)
    assert load_policy(tmp_path) == policy


def test_site_policy_and_join_commands(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from client.allowlist import current_app_hash
    from client.site_ops_cli import register

    app = typer.Typer()
    register(app)
    run = CliRunner().invoke
    site = tmp_path / "hospital-b"
    site.mkdir()
    (site / "site.toml").write_text('name = "b"\n', encoding="utf-8")
    assert run(app, ["policy", "init", str(site)]).exit_code == 0
    assert load_policy(site).allowed_apps == (current_app_hash(),)
    assert run(app, ["policy", "init", str(site)]).exit_code == 1  # never overwrites silently
    assert run(app, ["policy", "allow", str(site), HASH]).exit_code == 0
    assert load_policy(site).allowed_apps == (current_app_hash(), HASH)
    assert run(app, ["policy", "hash"]).stdout.strip() == current_app_hash()
    shown = run(app, ["policy", "show", str(site)]).stdout
    assert "min-slices = 5" in shown and "[weights-dp], each training reply" not in shown  # off: no line
    policy_file = site / "policy.toml"
    text = policy_file.read_text(encoding="utf-8")
    policy_file.write_text(
        text.replace("[weights-dp]\nenabled = false", "[weights-dp]\nenabled = true"), "utf-8"
    )
    # the default multiplier (0.1) lets the coordinator, who sees the update, tell a patient's presence
    assert "weak protection" in run(app, ["policy", "show", str(site)]).stdout

    assert run(app, ["keys", str(site)]).exit_code == 0
    keys_dir = tmp_path / "hospital-b.keys"
    assert (keys_dir / "supernode_ec384").stat().st_mode & 0o777 == 0o600
    assert (keys_dir / "supernode_ec384.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert run(app, ["keys", str(site)]).exit_code == 1  # the registered key is never replaced silently
    ca = tmp_path / "ca.crt"
    ca.write_text("x", encoding="utf-8")
    out = run(app, ["join", str(site), "--superlink", "link.example:9092", "--ca", str(ca), "--port", "9200"])
    assert out.exit_code == 0, out.output
    line = out.stdout.strip()
    assert line.startswith(
        "FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 sarcofed-supernode"
    )
    for part in (
        "--superlink link.example:9092",
        f"--root-certificates {ca}",
        f"--auth-supernode-private-key {keys_dir / 'supernode_ec384'}",
        f"--node-config 'site-dir=\"{site}\"'",
        "--port 9200",
    ):
        assert part in line
