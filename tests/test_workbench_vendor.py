"""The vendored NiiVue bundle: the pinned file, its licences, shipped in the wheel and served under
the workbench's CSP (the browser test in test_workbench_browser.py checks that it renders)."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from fastapi.testclient import TestClient

from client.workbench.api import CSP, STATIC, create_app
from client.workbench.state import WorkbenchState

VENDOR = STATIC / "vendor" / "niivue"
ROOT = Path(__file__).resolve().parents[1]


def test_bundle_is_the_pinned_file_with_its_licences() -> None:
    readme = (VENDOR / "README.md").read_text(encoding="utf-8")
    pinned = re.search(r"sha256 of `niivue.js`: `([0-9a-f]{64})`", readme)
    assert pinned, "README.md pins the bundle's sha256"
    assert hashlib.sha256((VENDOR / "niivue.js").read_bytes()).hexdigest() == pinned.group(1)
    assert "BSD 2-Clause" in (VENDOR / "LICENSE").read_text(encoding="utf-8")
    third = (VENDOR / "THIRD_PARTY_LICENSES").read_text(encoding="utf-8")
    for package in ("gl-matrix", "nifti-reader-js", "fflate", "zarrita", "numcodecs"):
        assert f"\n{package} " in third, package
    # the version shown to users is the vendored one
    assert 'NIIVUE_VERSION = "0.69.0"' in (STATIC / "nvview.js").read_text(encoding="utf-8")
    assert "@niivue/niivue@0.69.0" in readme


def test_bundle_is_package_data() -> None:
    """pip alone must install the viewer: every vendored file matches a package-data pattern."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["client.workbench.static"]
    shipped = {p.relative_to(STATIC) for pattern in patterns for p in STATIC.glob(pattern) if p.is_file()}
    vendored = {p.relative_to(STATIC) for p in VENDOR.iterdir()}
    assert vendored and vendored <= shipped, vendored - shipped
    assert {Path("nvview.js"), Path("app.js"), Path("index.html")} <= shipped


def test_bundle_is_served_as_javascript_under_the_csp(tmp_path: Path) -> None:
    client = TestClient(create_app(WorkbenchState(root=tmp_path, site_dir=None)))
    res = client.get("/static/vendor/niivue/niivue.js")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/javascript")  # nosniff: a module needs a JS type
    assert res.headers["content-security-policy"] == CSP
    assert res.content == (VENDOR / "niivue.js").read_bytes()
    # the CSP needs no relaxation for NiiVue: no inline script or style, no eval, no worker
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "worker-src" not in CSP
