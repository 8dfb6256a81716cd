"""Workbench HTTP API: folder confinement, original files in downloads, saving into a site dataset."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from client.workbench.api import STATIC, create_app
from client.workbench.segment import threshold_presegment
from client.workbench.state import WorkbenchState
from common.dataset import load_site, load_slice
from common.demo.series import DemoSeries, make_series
from common.masks import read_mask


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSeries:
    return make_series(tmp_path_factory.mktemp("wb") / "ct", slices=48, size=96, seed=1)


def _client(demo: DemoSeries, site: Path | None) -> TestClient:
    return TestClient(create_app(WorkbenchState(root=demo.folder, site_dir=site)))


def _main_key(client: TestClient, demo: DemoSeries) -> str:
    listing = client.get("/api/series").json()
    return next(s["key"] for s in listing["series"] if s["uid"] == demo.series_uid)


def test_lists_series_and_refuses_paths_outside(demo: DemoSeries, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = demo.folder / "escape"
    if not link.exists():
        os.symlink(outside, link)
    client = _client(demo, None)
    listing = client.get("/api/series").json()
    assert sorted(s["count"] for s in listing["series"]) == [5, 48]
    for bad in ("..", "../", "/etc", str(outside), "escape", "escape/", "sub/../..", "%2e%2e"):
        response = client.get("/api/series", params={"path": bad})
        assert response.status_code in (403, 404), bad
        assert response.status_code == 403 or "not a folder" in response.text
    assert client.get("/api/series", params={"path": ".."}).status_code == 403
    assert client.get("/api/series", params={"path": "escape"}).status_code == 403
    assert client.get("/api/series/unknown/meta").status_code == 404


def test_host_check_and_no_external_urls(demo: DemoSeries) -> None:
    client = _client(demo, None)
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    # our own files; the vendored NiiVue bundle names URLs in its code (docs, demo loaders), and
    # that the page fetches nothing from elsewhere is checked in the browser (test_niivue_...)
    for path in (p for p in STATIC.iterdir() if p.is_file()):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name


def test_views_have_true_aspect(demo: DemoSeries) -> None:
    from PIL import Image

    client = _client(demo, None)
    key = _main_key(client, demo)
    meta = client.get(f"/api/series/{key}/meta").json()
    nz, _ny, nx = meta["shape"]
    dz, _, dx = meta["spacing_mm"]
    first, last = demo.l3
    assert first <= (meta["suggestion"]["start"] + meta["suggestion"]["end"]) / 2 <= last
    image = Image.open(io.BytesIO(client.get(f"/api/series/{key}/coronal.png", params={"index": 40}).content))
    assert image.size == (nx, round(nz * dz / dx))
    assert client.get(f"/api/series/{key}/axial.png", params={"index": nz}).status_code == 422
    assert (
        client.get(f"/api/series/{key}/axial.png", params={"index": 0, "preset": "lung"}).status_code == 422
    )


def test_raw_hu_for_the_browser_viewer(demo: DemoSeries) -> None:
    from common.series import load_volume, scan_folder

    client = _client(demo, None)
    key = _main_key(client, demo)
    meta = client.get(f"/api/series/{key}/meta").json()
    assert meta["orientation"]["axial"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    volume = load_volume(next(s for s in scan_folder(demo.folder).series if s.series_uid == demo.series_uid))
    raw = np.frombuffer(client.get(f"/api/series/{key}/volume.i16").content, dtype="<i2")
    assert raw.size == np.prod(meta["shape"])
    assert np.array_equal(raw.reshape(meta["shape"]), np.rint(volume.hu).astype(np.int16))
    session = client.post(f"/api/series/{key}/segment", json={"start": 20, "end": 21}).json()
    one = np.frombuffer(client.get(f"/api/session/{session['session']}/hu/1.i16").content, dtype="<i2")
    assert np.array_equal(one.reshape(volume.hu.shape[1:]), np.rint(volume.hu[21]).astype(np.int16))
    assert client.get(f"/api/session/{session['session']}/hu/2.i16").status_code == 404
    assert client.get("/api/info").json()["brush_hu"]["1"] == [-29.0, 150.0]


def test_download_returns_original_bytes(demo: DemoSeries) -> None:
    client = _client(demo, None)
    key = _main_key(client, demo)
    response = client.get(f"/api/series/{key}/download", params={"start": 22, "end": 20})
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert names == [demo.files[k].name for k in (20, 21, 22)]
        for k, name in zip((20, 21, 22), names, strict=True):
            assert archive.read(name) == demo.files[k].read_bytes()


def _segment(client: TestClient, key: str, start: int, end: int) -> dict:
    response = client.post(f"/api/series/{key}/segment", json={"start": start, "end": end})
    assert response.status_code == 200, response.text
    return response.json()


def test_segment_edit_quantify_and_save_into_new_site(demo: DemoSeries, tmp_path: Path) -> None:
    site = tmp_path / "new-site"
    client = _client(demo, site)
    key = _main_key(client, demo)
    session = _segment(client, key, *demo.l3)
    assert session["method"] == "fallback" and "HU-threshold" in session["method_label"]
    sid, rows, cols = session["session"], session["slices"][0]["rows"], session["slices"][0]["cols"]
    labels = np.frombuffer(client.get(f"/api/session/{sid}/labels/0").content, dtype=np.uint8).reshape(
        rows, cols
    )
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.any()
    edited = labels.copy()
    edited[10:20, 10:30] = 3  # a painted VAT block
    assert client.put(f"/api/session/{sid}/labels/0", content=edited.tobytes()).status_code == 200
    assert client.put(f"/api/session/{sid}/labels/0", content=b"\x01" * 5).status_code == 422
    assert client.put(f"/api/session/{sid}/labels/0", content=bytes([7]) * edited.size).status_code == 422

    quant = client.get(
        f"/api/session/{sid}/quant", params={"height_m": 1.7, "sex": "M", "cutoff": "korean"}
    ).json()
    first = quant["rows"][0]
    pixel_cm2 = session["slices"][0]["spacing_mm"][0] * session["slices"][0]["spacing_mm"][1] / 100
    assert first["areas_cm2"]["visceral_fat"] == pytest.approx(np.count_nonzero(edited == 3) * pixel_cm2)
    assert first["smi"] == pytest.approx(first["areas_cm2"]["muscle"] / 1.7**2)
    assert first["sarcopenic"] == (first["smi"] < 39.8)
    csv_text = client.get(f"/api/session/{sid}/quant.csv", params={"cutoff": "korean"}).text
    assert csv_text.splitlines()[0].startswith("slice_index,file,muscle_area_cm2") and "korean" in csv_text
    assert client.get(f"/api/session/{sid}/quant", params={"cutoff": "nope"}).status_code == 422

    saved = client.post(f"/api/session/{sid}/save", json={"height_m": 1.7, "sex": "M"})
    assert saved.status_code == 200, saved.text
    n = demo.l3[1] - demo.l3[0] + 1
    dataset = load_site(site)
    assert len(dataset.rows) == n and dataset.rows[0].height_m == 1.7 and dataset.rows[0].sex == "M"
    loaded = load_slice(dataset, 0)
    assert np.array_equal(loaded.label, edited)  # canonical 1/2/3 read back through site.toml
    assert (site / dataset.rows[0].image).read_bytes() == demo.files[demo.l3[0]].read_bytes()
    # saving again replaces rows instead of duplicating them
    assert client.post(f"/api/session/{sid}/save", json={}).status_code == 200
    assert len(load_site(site).rows) == n


def test_save_uses_existing_site_values_and_format(demo: DemoSeries, tmp_path: Path) -> None:
    site = tmp_path / "somatic"
    site.mkdir()
    (site / "site.toml").write_text(
        'name = "b"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [7]\nvisceral_fat = [5]\nbackground = [2]\n'
    )
    (site / "manifest.csv").write_text("image;label;group\nold/a.dcm;old/a.tag;p1\n")
    client = _client(demo, site)
    session = _segment(client, _main_key(client, demo), demo.l3[0], demo.l3[0])
    sid = session["session"]
    labels = np.frombuffer(client.get(f"/api/session/{sid}/labels/0").content, dtype=np.uint8)
    assert client.post(f"/api/session/{sid}/save", json={}).status_code == 200
    text = (site / "manifest.csv").read_text().splitlines()
    assert text[0].split(";")[:3] == ["image", "label", "group"] and text[1].startswith(
        "old/a.dcm;old/a.tag;p1"
    )
    _image_rel, label_rel = text[2].split(";")[:2]
    assert label_rel.endswith(".tag")
    raw = read_mask(site / label_rel)
    assert set(np.unique(raw)) <= {0, 1, 5, 7}
    expected = np.array([0, 1, 7, 5])[labels.reshape(raw.shape)]
    assert np.array_equal(raw, expected)


def test_save_without_site_is_refused(demo: DemoSeries) -> None:
    client = _client(demo, None)
    sid = _segment(client, _main_key(client, demo), 0, 0)["session"]
    assert client.post(f"/api/session/{sid}/save", json={}).status_code == 409


def test_threshold_presegment_separates_sat_and_vat() -> None:
    hu = np.full((80, 80), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    hu[r < 36] = 40.0  # skin
    hu[r < 35] = -100.0  # subcutaneous fat
    hu[r < 28] = 50.0  # muscle wall
    hu[r < 22] = -90.0  # visceral fat
    mask = threshold_presegment(hu, (1.0, 1.0))
    assert mask[40, 40 - 31] == 2 and mask[40, 40 - 25] == 1 and mask[40, 40] == 3
