"""Real deployment on Flower's engine: a SuperLink (TLS + SuperNode auth) and three
SuperNodes on 127.0.0.1, each with its own demo site, validated with ``flwr run``.

Run 1: every site validates (one pins the app hash it reviewed); an unregistered
SuperNode is turned away. Run 2: one site's policy forbids ``evaluate``, another pins
a different app hash; the report says both, with the site's own reasons.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest
from deploy_harness import Deployment, deployment

from client.allowlist import code_hash
from client.audit import audit_path, read_audit, verify_chain
from client.policy import SitePolicy, write_policy
from common.demo.hospitals import DEMO_MIN_PATIENTS
from server.deploy import DeploymentError, run_status, write_connection

pytestmark = pytest.mark.slow

SIZE = 64
SLICES = 6
ENCODER = "tu-mobilenetv3_small_050"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from common.demo.hospitals import make_site, site_profile

    root = tmp_path_factory.mktemp("sites")
    return [
        make_site(root / f"site-{i}", site_profile(i), slices=SLICES, size=SIZE, seed=i, site_tag=str(i))
        for i in range(3)
    ]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.model import ModelSpec, build_model, save_model

    spec = ModelSpec(encoder=ENCODER, image_size=SIZE)
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", build_model(spec), spec)


def validation_config(dep: Deployment, model_path: Path, name: str) -> dict[str, object]:
    return {
        "study.mode": "evaluate",
        "study.model": str(model_path),
        "study.min-sites": 3,
        "study.round-timeout": 240.0,
        "study.output-dir": str(dep.root / "studies"),
        "study.run-name": name,
        "model.encoder": ENCODER,
        "model.image-size": SIZE,
        "eval.batch-size": SLICES,
    }


def report(dep: Deployment, name: str) -> dict[str, dict[str, object]]:
    data = json.loads((dep.root / "studies" / name / "report.json").read_text(encoding="utf-8"))
    return {s["site"]: s for s in data["sites"]}


def test_validation_study_on_the_deployment_engine(
    tmp_path: Path, sites: list[Path], model_path: Path
) -> None:
    with deployment(tmp_path / "deploy") as dep:
        dep.start_proxy()  # site-2 reaches the SuperLink only through the Fleet-only proxy
        nodes = [dep.add_site(site, via_proxy=i == 2) for i, site in enumerate(sites)]
        intruder_site = sites[0].parent / "intruder"
        intruder_site.symlink_to(sites[0], target_is_directory=True)
        intruder = dep.add_site(intruder_site, register=False, name="intruder", max_wait_time=30)

        # run 1: all three sites; site-0 pins the hash of the code it reviewed (the app snapshot)
        write_policy(
            sites[0], SitePolicy(allowed_apps=(code_hash(dep.app_dir),), min_patients=DEMO_MIN_PATIENTS)
        )
        status = dep.run(validation_config(dep, model_path, "all"), timeout=400)
        assert status.ok, status
        first = report(dep, "all")
        assert len(first) == 3, first.keys()
        assert {s["status"] for s in first.values()} == {"ok"}, first
        for site in first.values():
            assert site["payload"]["n_used"] == SLICES

        # the unregistered SuperNode never joined: it is refused at the Fleet API
        intruder.popen.wait(60)  # it gives up after --max-wait-time 30
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.text(), intruder.text()[-2000:]
        superlink_log = dep.procs["superlink"].text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in superlink_log
        assert all(p.popen.poll() is None for p in nodes), "a registered SuperNode died"

        # run 2: site-1 no longer accepts evaluate; site-2 pinned other code
        write_policy(sites[1], SitePolicy(accept_tasks=("train", "compare"), min_patients=DEMO_MIN_PATIENTS))
        write_policy(sites[2], SitePolicy(allowed_apps=("0" * 64,), min_patients=DEMO_MIN_PATIENTS))
        status = dep.run(validation_config(dep, model_path, "refusals"), timeout=400)
        assert status.ok, status
        second = {s["node_id"]: s for s in report(dep, "refusals").values()}
        by_site = {name: second[s["node_id"]] for name, s in first.items()}
        statuses = sorted((s["status"], s.get("reason") or "") for s in by_site.values())
        assert statuses[0][0] == "ok", statuses
        refused = [reason for status_, reason in statuses if status_ == "refused"]
        assert len(refused) == 2, statuses
        assert any("does not accept 'evaluate'" in r for r in refused), refused
        assert any("0" * 64 in r and "not on this site's allow-list" in r for r in refused), refused

        run_id = status.run_id
        assert run_status(run_id, "study", flwr_home=dep.flwr_home).ok
        assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in dep.procs["proxy"].text()

        # the Control API is not reachable through the proxy: flwr ls against it fails
        assert dep.proxy_address is not None
        write_connection(
            "via-proxy",
            dep.address.replace(str(dep.superlink_port), dep.proxy_address.split(":")[1]),
            dep.certs.ca_cert,
            flwr_home=dep.flwr_home,
            default=False,
        )
        with pytest.raises(DeploymentError):
            run_status(run_id, "via-proxy", flwr_home=dep.flwr_home)
        assert "proxy refused POST /v1/control/list-runs" in dep.procs["proxy"].text()

        # run 3: site-0's SuperNode crashes; the study still completes and says what happened
        nodes[0].stop()
        write_policy(sites[1], SitePolicy(min_patients=DEMO_MIN_PATIENTS))
        write_policy(sites[2], SitePolicy(min_patients=DEMO_MIN_PATIENTS))
        config = validation_config(dep, model_path, "dropout") | {
            "study.min-sites": 2,
            "study.round-timeout": 30.0,
        }
        status = dep.run(config, timeout=400)
        assert status.ok, status
        third = report(dep, "dropout")
        ok = sorted(name for name, s in third.items() if s["status"] == "ok")
        assert len(ok) == 2, third
        dropped = tomllib.loads((sites[0] / "site.toml").read_text(encoding="utf-8"))["name"]
        assert dropped not in ok
        print("dropout record:", {n: (s["status"], s.get("reason")) for n, s in third.items()})

    # every process was stopped (by pid / process group)
    assert all(p.popen.poll() is not None for p in dep.procs.values())
    # each site's audit log: received + sent (run 1), received + refused (run 2), intact chain
    for site in sites:
        entries = [e for e in read_audit(audit_path(site)) if e.task != "identify"]
        assert [e.event for e in entries][:2] == ["received", "sent"] or site == sites[1], entries
        assert verify_chain(audit_path(site)) == []
    refusals = [e for e in read_audit(audit_path(sites[2])) if e.event == "refused"]
    assert refusals and refusals[-1].app_hash != "0" * 64
    coordinator = [e["event"] for e in dep.coordinator_log.entries()] if dep.coordinator_log else []
    assert coordinator.count("supernode-registered") == 3
    assert coordinator.count("run-finished") == 3


def test_superlink_restart_fails_the_run_honestly_and_sites_reconnect(
    tmp_path: Path, sites: list[Path], model_path: Path
) -> None:
    from server.deploy import start_run, wait_for_run

    for site in sites:
        write_policy(site, SitePolicy(min_patients=DEMO_MIN_PATIENTS))
    with deployment(tmp_path / "deploy") as dep:
        nodes = [dep.add_site(site) for site in sites[:2]]
        config = validation_config(dep, model_path, "interrupted") | {"study.min-sites": 2}
        run_id = start_run(dep.app_dir, "study", config, flwr_home=dep.flwr_home)
        time.sleep(10)  # the ServerApp is running (waiting for / talking to the sites)
        dep.procs.pop("superlink").stop()
        dep.start_superlink()  # same port, same --database
        interrupted = wait_for_run(run_id, "study", timeout=120, flwr_home=dep.flwr_home)
        assert interrupted.status == "finished:failed", interrupted  # never reported as completed
        status = dep.run(
            validation_config(dep, model_path, "after-restart") | {"study.min-sites": 2}, timeout=400
        )
        assert status.ok, status
        assert {s["status"] for s in report(dep, "after-restart").values()} == {"ok"}
        assert all(p.popen.poll() is None for p in nodes), "a SuperNode gave up during the restart"
