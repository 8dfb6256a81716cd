"""``sarcofed study demo`` makes the simulated hospitals before ``flwr run``, from the run
config exactly as the ClientApps will see it (pyproject defaults + overrides)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.demo.hospitals import make_site, site_profile
from common.errors import SarcofedError
from server.demo_study import make_demo_sites, simulation_study

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_is_pyprojects_run_config_with_the_overrides() -> None:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    study = simulation_study(ROOT, {})
    assert study.demo.slices == defaults["config"]["demo.slices"]
    assert study.demo.size == defaults["config"]["demo.size"]
    assert simulation_study(ROOT, {"demo.slices": 3}).demo.slices == 3
    with pytest.raises(SarcofedError, match=r"demo\.slicez"):
        simulation_study(ROOT, {"demo.slicez": 3})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_demo_sites_are_made_as_the_simulated_sites_made_them(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo-sites"
    kept = demo_dir / "site-1"
    kept.mkdir(parents=True)
    (kept / "manifest.csv").write_text("image,label\nct/a.dcm,labels/a.png\n", encoding="utf-8")
    config: dict[str, str | int] = {"demo.dir": str(demo_dir), "demo.slices": 2, "demo.size": 48}

    sites = make_demo_sites(ROOT, config, 3)

    assert sites == [demo_dir / "site-0", demo_dir / "site-1", demo_dir / "site-2"]
    assert _files(kept) == {"manifest.csv": b"image,label\nct/a.dcm,labels/a.png\n"}  # used as it is
    for partition in (0, 2):  # profile, seed and tag of the partition: the same data as before
        expected = make_site(
            tmp_path / f"expected-{partition}",
            site_profile(partition),
            slices=2,
            size=48,
            seed=partition,
            site_tag=str(partition),
        )
        assert _files(sites[partition]) == _files(expected)
    assert make_demo_sites(ROOT, config, 3) == sites  # a second call makes nothing
