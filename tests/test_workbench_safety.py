"""Workbench data safety: nothing written outside the site, no lost manifest rows between
processes, request bodies refused before they are read, a JSON error for every failure."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

import client.workbench.api as api
from client.workbench.api import create_app
from client.workbench.state import WorkbenchState
from common.dataset import load_site, load_slice
from common.demo.series import DemoSeries, make_series

REPO = Path(__file__).resolve().parents[1]
TRAVERSAL = "../../../ESCAPED-053"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSeries:
    return make_series(tmp_path_factory.mktemp("wbs") / "ct", slices=48, size=64, seed=3)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _main_key(client: TestClient | httpx.Client, uid: str) -> str:
    listing = client.get("/api/series").json()
    return next(s["key"] for s in listing["series"] if s["uid"] == uid)


def _labels(rows: int, cols: int, k: int) -> bytes:
    """A small canonical mask that differs per slice (so every saved mask is distinct)."""
    mask = np.zeros((rows, cols), dtype=np.uint8)
    mask[4 : 10 + k % 20, 4:20] = 1
    mask[30:40, 30:40] = 2
    return mask.tobytes()


def _segment_one(client: TestClient | httpx.Client, key: str, k: int) -> str:
    response = client.post(f"/api/series/{key}/segment", json={"start": k, "end": k})
    assert response.status_code == 200, response.text
    session = response.json()
    rows, cols = session["slices"][0]["rows"], session["slices"][0]["cols"]
    put = client.put(f"/api/session/{session['session']}/labels/0", content=_labels(rows, cols, k))
    assert put.status_code == 200, put.text
    return str(session["session"])


# ------------------------------------------------------------------ paths


def test_traversal_in_sop_instance_uid_writes_nothing_outside_the_site(
    demo: DemoSeries, tmp_path: Path
) -> None:
    base = tmp_path / "a" / "b"
    series = base / "series"
    series.mkdir(parents=True)
    first = demo.l3[0] - 2
    for k in range(first, first + 5):  # five slices; the middle one carries the traversal
        ds = pydicom.dcmread(demo.files[k])
        if k == first + 2:
            ds.SOPInstanceUID = TRAVERSAL  # as an external CD might carry it
            ds.file_meta.MediaStorageSOPInstanceUID = TRAVERSAL
        with pydicom.config.disable_value_validation():
            ds.save_as(series / ("evil.dcm" if k == first + 2 else f"ok{k}.dcm"))
    site = base / "site"
    before = _files_under(tmp_path)
    client = TestClient(create_app(WorkbenchState(root=series, site_dir=site)))
    key = _main_key(client, demo.series_uid)
    sid = _segment_one(client, key, 2)
    saved = client.post(f"/api/session/{sid}/save", json={"height_m": 1.7, "sex": "F"})
    assert saved.status_code == 200, saved.text
    written = _files_under(tmp_path) - before
    outside = [p for p in written if site.resolve() not in p.resolve().parents]
    assert written and not outside, outside
    dataset = load_site(site)
    assert len(dataset.rows) == 1
    row = dataset.rows[0]
    # names are sarcofed's own (hashed), never DICOM text
    assert re.fullmatch(r"images/wb-[0-9a-f]{20}\.dcm", row.image), row.image
    assert re.fullmatch(r"labels/wb-[0-9a-f]{20}\.png", row.label), row.label
    assert "ESCAPED" not in (site / "manifest.csv").read_text(encoding="utf-8")
    loaded = load_slice(dataset, 0)  # reads back through the site loader
    assert np.array_equal(loaded.label, np.frombuffer(_labels(64, 64, 2), np.uint8).reshape(64, 64))
    assert (site / row.image).read_bytes() == (series / "evil.dcm").read_bytes()


def test_symlinked_subfolder_leading_out_of_the_site_is_refused(demo: DemoSeries, tmp_path: Path) -> None:
    site, outside = tmp_path / "site", tmp_path / "outside"
    site.mkdir()
    outside.mkdir()
    os.symlink(outside, site / "images")
    client = TestClient(create_app(WorkbenchState(root=demo.folder, site_dir=site)))
    sid = _segment_one(client, _main_key(client, demo.series_uid), demo.l3[0])
    response = client.post(f"/api/session/{sid}/save", json={})
    assert response.status_code == 403, response.text
    assert "site folder" in response.json()["detail"]
    assert not any(outside.iterdir())
    assert not (site / "manifest.csv").exists()


def test_site_with_data_root_is_still_refused(demo: DemoSeries, tmp_path: Path) -> None:
    site, export = tmp_path / "site", tmp_path / "export"
    site.mkdir()
    export.mkdir()
    (site / "site.toml").write_text(
        f'name = "x"\ndata_root = "{export}"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [2]\n'
        "visceral_fat = [3]\n",
        encoding="utf-8",
    )
    client = TestClient(create_app(WorkbenchState(root=demo.folder, site_dir=site)))
    sid = _segment_one(client, _main_key(client, demo.series_uid), demo.l3[0])
    response = client.post(f"/api/session/{sid}/save", json={})
    assert response.status_code == 400 and "data_root" in response.json()["detail"]
    assert not any(export.iterdir()) and not (site / "manifest.csv").exists()


# ------------------------------------------------------------------ errors


def test_non_utf8_manifest_gives_a_json_error_naming_the_file(demo: DemoSeries, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(
        'name = "x"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [2]\nvisceral_fat = [3]\n', encoding="utf-8"
    )
    manifest = site / "manifest.csv"
    manifest.write_bytes("image,label\nold/pati\u00e9nt.dcm,old/pati\u00e9nt.png\n".encode("latin-1"))
    client = TestClient(create_app(WorkbenchState(root=demo.folder, site_dir=site)))
    sid = _segment_one(client, _main_key(client, demo.series_uid), demo.l3[0])
    response = client.post(f"/api/session/{sid}/save", json={})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert str(manifest) in detail and "UTF-8" in detail
    assert manifest.read_bytes().startswith(b"image,label\nold/pati\xe9nt")  # left as it was
    assert not (site / "images").exists()


def test_unexpected_error_is_json_and_logged(
    demo: DemoSeries, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object, **__: object) -> bytes:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(api.render, "view_png", broken)
    client = TestClient(create_app(WorkbenchState(root=demo.folder)))
    key = _main_key(client, demo.series_uid)
    with caplog.at_level("ERROR", logger="client.workbench.api"):
        response = client.get(f"/api/series/{key}/axial.png", params={"index": 0})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "RuntimeError" in response.json()["detail"] and "log" in response.json()["detail"]
    assert any(r.exc_info and "renderer exploded" in str(r.exc_info[1]) for r in caplog.records)


# ------------------------------------------------------------------ body size


async def _call(app: object, scope: dict, chunks: Iterator[bytes], consumed: list[int]) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    return sent


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }


def test_streamed_body_without_length_is_cut_at_the_limit(demo: DemoSeries) -> None:
    limit, chunk = 1 << 20, 64 << 10
    app = create_app(WorkbenchState(root=demo.folder), max_body_bytes=limit)
    sid = _segment_one(TestClient(app), _main_key(TestClient(app), demo.series_uid), demo.l3[0])
    consumed: list[int] = []
    endless = iter(lambda: b"\x01" * chunk, None)  # a body that never ends
    scope = _scope(f"/api/session/{sid}/labels/0", [(b"transfer-encoding", b"chunked")])
    sent = asyncio.run(_call(app, scope, endless, consumed))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert sum(consumed) <= limit + chunk
    assert b"too large" in b"".join(m.get("body", b"") for m in sent[1:])


def test_declared_length_over_the_limit_is_refused_before_reading(demo: DemoSeries) -> None:
    app = create_app(WorkbenchState(root=demo.folder), max_body_bytes=1 << 20)
    sid = _segment_one(TestClient(app), _main_key(TestClient(app), demo.series_uid), demo.l3[0])
    consumed: list[int] = []
    body = iter([b"\x01" * (64 << 10)] * 40)
    headers = [(b"content-length", str(40 * (64 << 10)).encode())]
    sent = asyncio.run(_call(app, _scope(f"/api/session/{sid}/labels/0", headers), body, consumed))
    assert sent[0]["status"] == 413 and consumed == []


# ------------------------------------------------------------------ real server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(folder: Path, site: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    command = [sys.executable, "-m", "server.cli", "site", "workbench", str(folder), "--site", str(site)]
    process = subprocess.Popen(
        [*command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"workbench exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/api/info", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("workbench did not start in 60 s")


@pytest.fixture(scope="module")
def servers(demo: DemoSeries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    site = tmp_path_factory.mktemp("shared") / "site"
    started = [_start(demo.folder, site) for _ in range(2)]
    try:
        yield site, [url for _, url in started]
    finally:
        for process, _ in started:
            process.terminate()
            process.wait(timeout=20)


def test_two_processes_saving_concurrently_keep_every_row(
    demo: DemoSeries, servers: tuple[Path, list[str]]
) -> None:
    site, urls = servers
    per_server = 20
    clients = [httpx.Client(base_url=url, timeout=60) for url in urls]
    jobs: list[tuple[httpx.Client, str]] = []
    for s, client in enumerate(clients):
        key = _main_key(client, demo.series_uid)
        jobs += [(client, _segment_one(client, key, s * per_server + k)) for k in range(per_server)]
    start = threading.Barrier(len(jobs))
    statuses: list[int] = []

    def save(client: httpx.Client, sid: str) -> None:
        start.wait()
        statuses.append(client.post(f"/api/session/{sid}/save", json={"height_m": 1.7}).status_code)

    threads = [threading.Thread(target=save, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    assert statuses == [200] * len(jobs)
    dataset = load_site(site)
    assert len(dataset.rows) == len(jobs) == 40
    assert len({r.image for r in dataset.rows}) == 40
    sizes = sorted(int(np.count_nonzero(load_slice(dataset, i).label == 1)) for i in range(40))
    expected = sorted(16 * (6 + k % 20) for k in range(40))
    assert sizes == expected  # every mask is the one its save sent, none overwritten by another
    assert not [p.name for p in site.rglob("*") if ".tmp" in p.name]


def test_real_server_answers_413_before_the_body_is_sent(
    demo: DemoSeries, servers: tuple[Path, list[str]]
) -> None:
    _, urls = servers
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        sid = _segment_one(client, _main_key(client, demo.series_uid), demo.l3[0])
    port = int(urls[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            f"PUT /api/session/{sid}/labels/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Content-Type: application/octet-stream\r\nContent-Length: 209715200\r\n\r\n"
        )
        conn.sendall(b"\x00" * 4096)  # 4 KiB of a declared 200 MB
        reply = b""
        while b"}" not in reply:  # the whole JSON answer; then the server closes the connection
            part = conn.recv(65536)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"too large" in reply
