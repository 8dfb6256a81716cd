"""Many sites for real: ten SuperNodes on Flower's deployment engine (a real SuperLink with TLS and
SuperNode authentication on 127.0.0.1) in one evaluate-only study; every site is in report.json
with status ok and the slices it scored. The harness stops every process it started, by pid."""

from __future__ import annotations

import json
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_harness import deployment

N_SITES = 10
SLICES = 6  # the default site policy releases nothing under 5 slices
SIZE = 64
ENCODER = "tu-mobilenetv3_small_050"
#: Ten fresh ClientApp processes import torch at once on a small machine: a wide margin.
ROUND_TIMEOUT_S = 240.0


@pytest.mark.slow
def test_ten_supernodes_in_one_evaluate_study_are_all_reported(tmp_path: Path) -> None:
    from common.demo.hospitals import make_site, site_profile
    from common.model import ModelSpec, build_model, save_model

    sites = [
        make_site(tmp_path / f"site-{i}", site_profile(i), slices=SLICES, size=SIZE, seed=i, site_tag=str(i))
        for i in range(N_SITES)
    ]
    names = [str(tomllib.loads((s / "site.toml").read_text(encoding="utf-8"))["name"]) for s in sites]
    assert len(set(names)) == N_SITES
    test_started = time.monotonic()
    spec = ModelSpec(encoder=ENCODER, image_size=SIZE)
    model = save_model(tmp_path / "model.pt", build_model(spec), spec)
    with deployment(tmp_path / "deploy") as dep:
        # registering a SuperNode is a `flwr` CLI call (seconds each): a few at a time
        with ThreadPoolExecutor(max_workers=4) as pool:
            nodes = list(pool.map(dep.add_site, sites))
        config = {
            "study.mode": "evaluate",
            "study.model": str(model),
            "study.min-sites": N_SITES,  # the study waits until all ten are connected
            "study.round-timeout": ROUND_TIMEOUT_S,
            "study.output-dir": str(dep.root / "studies"),
            "study.run-name": "ten-sites",
            "model.encoder": ENCODER,
            "model.image-size": SIZE,
            "eval.batch-size": SLICES,
        }
        started = time.monotonic()
        status = dep.run(config, timeout=600)
        seconds = time.monotonic() - started
        assert status.ok, status
        assert all(p.popen.poll() is None for p in nodes), "a SuperNode died"
        report = json.loads((dep.root / "studies" / "ten-sites" / "report.json").read_text())
    assert all(p.popen.poll() is not None for p in dep.procs.values()), "a process outlived the harness"
    by_site = {s["site"]: s for s in report["sites"]}
    assert sorted(by_site) == sorted(names)
    for name in names:
        result = by_site[name]
        assert result["status"] == "ok", result
        assert result["payload"]["n_used"] == SLICES, (name, result["payload"]["excluded"])
    whole = time.monotonic() - test_started
    print(f"{N_SITES}-SuperNode evaluate study: {seconds:.0f} s (whole test {whole:.0f} s)")
