"""Leak test on the real deployment engine: canary strings planted in DICOM identifiers
(PatientID, PatientName, descriptions, UIDs' hashed part), file names, group keys and
site.toml; every task runs (identify, train, evaluate, compare with discrepancy); no
canary may appear in any byte that left the sites: their audit logs (exactly what was
sent), the SuperLink's state database and log, the ServerApp's logs and everything the
coordinator wrote.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from deploy_harness import deployment

from client.audit import audit_path, read_audit
from client.policy import SitePolicy, write_policy
from common.demo.hospitals import DEMO_MIN_PATIENTS
from server.deploy import flwr_env

pytestmark = pytest.mark.slow

CANARIES = ("QZXCANARYA71", "QZXCANARYB72")
SIZE = 64
ENCODER = "tu-mobilenetv3_small_050"


def _canary_sites(root: Path) -> list[Path]:
    from common.demo.hospitals import make_site, site_profile

    sites = []
    for i, canary in enumerate(CANARIES):
        site = make_site(
            root / f"site-{i}", site_profile(i), slices=8, size=SIZE, seed=i, site_tag=str(i), canary=canary
        )
        write_policy(
            site, SitePolicy(min_slices=2, min_patients=DEMO_MIN_PATIENTS)
        )  # tiny demo sites; the leak is what matters here
        sites.append(site)
    return sites


def _hits(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            data = file.read_bytes().lower()
            found += [f"{file}: {c}" for c in CANARIES if c.lower().encode() in data]
    return found


def test_no_canary_leaves_a_site(tmp_path: Path) -> None:
    sites = _canary_sites(tmp_path / "sites")
    # the canaries are really there, in every place the brief names
    for site, canary in zip(sites, CANARIES, strict=True):
        assert canary in (site / "site.toml").read_text(encoding="utf-8")
        assert canary in (site / "manifest.csv").read_text(encoding="utf-8")
        assert any(canary.encode() in p.read_bytes() for p in (site / "images").iterdir())
    with deployment(tmp_path / "deploy") as dep:
        for site in sites:
            dep.add_site(site)
        common = {
            "study.min-sites": 2,
            "study.round-timeout": 300.0,
            "study.output-dir": str(dep.root / "studies"),
            "model.encoder": ENCODER,
            "model.image-size": SIZE,
            "train.local-epochs": 1,
            "train.batch-size": 4,
            # every site trains here (the demo's exclusions would leave one): training is a data path too
            "study.exclude-from-training": "",
        }
        trained = dep.run(
            common | {"study.mode": "train+evaluate", "study.num-rounds": 1, "study.run-name": "t"}
        )
        assert trained.ok, trained
        compared = dep.run(common | {"study.mode": "compare", "study.run-name": "c"})
        assert compared.ok, compared
        logs = [
            subprocess.run(
                ["flwr", "log", str(run.run_id), "study", "--show"],
                capture_output=True,
                text=True,
                env=flwr_env(dep.flwr_home),
                timeout=120,
                check=False,
            ).stdout
            for run in (trained, compared)
        ]
        (dep.root / "serverapp-logs.txt").write_text("\n".join(logs), encoding="utf-8")
        assert "sites" in logs[0] or "site" in logs[0]  # the log was really fetched

    sent = {(e.task, e.event) for site in sites for e in read_audit(audit_path(site))}
    assert {("train", "sent"), ("evaluate", "sent"), ("compare", "sent")} <= sent, sent
    left = [audit_path(site) for site in sites] + [
        dep.root / "studies",
        dep.root / "serverapp-logs.txt",
        dep.root / "coordinator.jsonl",
        dep.root / "logs" / "superlink.log",
        dep.root / "superlink-home",
        *dep.root.glob("superlink.db*"),
    ]
    assert all(p.exists() for p in left[:4]) and (dep.root / "superlink.db").exists(), left
    assert _hits(left) == []
    # and the test would see a leak: the sites' own files are full of canaries
    assert _hits([sites[0]])
