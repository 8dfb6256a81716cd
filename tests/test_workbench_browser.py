"""The workbench in a real (headless) Chromium: select L3, download, segment, paint, save,
and the viewer controls a radiologist expects (wheel, keys, window/level, zoom, HU-limited
brush, undo/redo keys, the unsaved-edits guard).

Needs Debian's chromium (``apt-get install -y chromium``) and the ``playwright`` Python package
(never ``playwright install``: browsers are not downloaded). Screenshots of each view go to
``test-artifacts/workbench/``.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "workbench"

pytestmark = [
    pytest.mark.slow,
    # Skipped on a developer machine without chromium; never in CI (.ci/run installs it), where
    # a missing browser must fail the run rather than hide the browser test.
    pytest.mark.skipif(
        not CHROMIUM.exists() and os.environ.get("CI") != "true",
        reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, object, Path]]:
    import uvicorn

    from client.workbench.api import create_app
    from client.workbench.state import WorkbenchState
    from common.demo.series import make_series

    demo = make_series(tmp_path / "ct", slices=48, size=96, seed=1)
    site = tmp_path / "site"
    app = create_app(WorkbenchState(root=demo.folder, site_dir=site))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", demo, site
    srv.should_exit = True
    thread.join(timeout=10)


@contextmanager
def _page(errors: list[str]) -> Iterator[object]:
    """A headless Debian chromium page (WebGL not needed: the views are 2-D canvases)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        # an explicit context: a page from browser.new_page() takes its context down with it on
        # close, before a beforeunload dialog could be seen
        context = browser.new_context(viewport={"width": 1500, "height": 950}, accept_downloads=True)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        try:
            yield page
        finally:
            browser.close()


def _open(page, url: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(url)
    page.wait_for_selector("#select-view[data-loaded]")
    page.wait_for_selector("#coronal-wrap .guide.start")


def _close_with_unload(page) -> None:  # type: ignore[no-untyped-def]
    """Close the page as a user closing the tab would (beforeunload runs); wait until it is gone."""
    page.close(run_before_unload=True)
    for _ in range(50):
        page.context.cookies()  # a round trip to the browser: delivers a dialog event, if any
        if page.is_closed():
            return
        time.sleep(0.1)


def _y_of(page, wrap: str, k: int, nz: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    box = page.locator(wrap).bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + (k + 0.5) / nz * box["height"]


def _drag(page, handle: str, to: tuple[float, float]) -> None:  # type: ignore[no-untyped-def]
    box = page.locator(handle).bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(to[0], to[1], steps=6)
    page.mouse.up()


def test_select_download_segment_paint_save(server: tuple[str, object, Path]) -> None:
    from common.dataset import load_site, load_slice

    url, demo, site = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    nz = len(demo.files)  # type: ignore[attr-defined]
    l3_first, l3_last = demo.l3  # type: ignore[attr-defined]
    errors: list[str] = []
    dialogs: list[str] = []
    with _page(errors) as page:  # type: ignore[var-annotated]
        page.on("dialog", lambda d: (dialogs.append(d.type), d.accept()))
        _open(page, url)
        # the suggestion is preselected: the true L3
        assert f"Slices {l3_first}-{l3_last}" in page.inner_text("#selection")
        page.screenshot(path=str(ARTIFACTS / "01-selection-suggested.png"))

        # drag the guide lines on the coronal and the sagittal view
        start, end = l3_first + 1, l3_first + 2
        _drag(page, "#coronal-wrap .guide.start", _y_of(page, "#coronal-wrap", start, nz))
        _drag(page, "#sagittal-wrap .guide.end", _y_of(page, "#sagittal-wrap", end, nz))
        assert f"Slices {start}-{end}" in page.inner_text("#selection")
        page.screenshot(path=str(ARTIFACTS / "02-selection-dragged.png"))

        # Slice mode: one guide line
        page.click("#mode-slice")
        assert page.locator("#coronal-wrap .guide.end").is_hidden()
        single = int(page.inner_text("#selection").split()[1])
        assert start <= single <= end
        page.screenshot(path=str(ARTIFACTS / "03-slice-mode.png"))
        page.click("#mode-range")
        _drag(page, "#coronal-wrap .guide.start", _y_of(page, "#coronal-wrap", start, nz))
        _drag(page, "#coronal-wrap .guide.end", _y_of(page, "#coronal-wrap", end, nz))
        assert f"Slices {start}-{end}" in page.inner_text("#selection")

        # download the selection: the original files, unchanged
        with page.expect_download() as info:
            page.click("#download")
        zipped = Path(info.value.path())
        with zipfile.ZipFile(zipped) as archive:
            expected = [demo.files[k] for k in range(start, end + 1)]  # type: ignore[attr-defined]
            assert archive.namelist() == [f.name for f in expected]
            for f in expected:
                assert archive.read(f.name) == f.read_bytes()

        # segment, then paint a VAT stroke
        page.click("#segment")
        page.wait_for_selector("#label-view:not([hidden])")
        page.wait_for_function("() => document.querySelectorAll('#quant-table tbody tr').length > 0")
        assert "HU-threshold" in page.inner_text("#method")
        page.check("input[name=cls][value='3']")
        # a stroke through air: the correction is deliberate, so the HU limit (on by default) is
        # switched off for it
        page.uncheck("#hu-limit")
        page.fill("#brush-size", "2")
        canvas = page.locator("#ov-canvas").bounding_box()
        rows = cols = 96
        stroke = [(20, 30), (20, 60)]  # native (row, col): a horizontal stroke in the upper image
        pts = [
            (
                canvas["x"] + (c + 0.5) / cols * canvas["width"],
                canvas["y"] + (r + 0.5) / rows * canvas["height"],
            )
            for r, c in stroke
        ]
        page.mouse.move(*pts[0])
        page.mouse.down()
        page.mouse.move(*pts[1], steps=10)
        page.mouse.up()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "04-labelling-painted.png"))

        page.fill("#height", "1.65")
        page.select_option("#cutoff", "martin2013")
        page.click("#save")
        page.wait_for_function("() => document.getElementById('save-status').textContent.startsWith('Saved')")
        page.screenshot(path=str(ARTIFACTS / "05-saved.png"))
        _close_with_unload(page)

    assert not errors, errors
    assert dialogs == [], f"saved edits must not prompt on leaving: {dialogs}"
    dataset = load_site(site)
    assert len(dataset.rows) == end - start + 1
    assert all(row.height_m == 1.65 for row in dataset.rows)
    first = load_slice(dataset, 0)
    assert (site / dataset.rows[0].image).read_bytes() == demo.files[start].read_bytes()  # type: ignore[attr-defined]
    line = first.label[20, 32:59]
    assert np.all(line == 3), line  # the painted stroke came back as canonical VAT


def _volume(demo: object) -> np.ndarray:
    from common.series import load_volume, scan_folder

    listing = scan_folder(demo.folder)  # type: ignore[attr-defined]
    return load_volume(listing.series[0]).hu


def _point(page, selector: str, row: float, col: float, rows: int, cols: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Screen point of native pixel (row, col) of a canvas (zoom and pan included)."""
    box = page.locator(selector).bounding_box()
    return box["x"] + (col + 0.5) / cols * box["width"], box["y"] + (row + 0.5) / rows * box["height"]


def _axial_slice(page) -> int:  # type: ignore[no-untyped-def]
    # text_content: with NiiVue as the viewer the canvas views (and this heading) are hidden
    return int((page.text_content("#axial-index") or "").split()[1])


def test_viewer_controls_wheel_keys_window_zoom_hu(server: tuple[str, object, Path]) -> None:
    url, demo, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    hu = _volume(demo)
    nz, ny, nx = hu.shape
    errors: list[str] = []
    with _page(errors) as page:  # type: ignore[var-annotated]
        _open(page, url)
        first = _axial_slice(page)

        # orientation letters and the suggested vertebra labels
        assert [page.inner_text(f"#axial-wrap .orient.{s}") for s in ("top", "bottom", "left", "right")] == [
            "A", "P", "R", "L"
        ]  # fmt: skip
        assert page.inner_text("#coronal-wrap .orient.top") == "S"
        assert page.inner_text("#sagittal-wrap .orient.left") == "A"
        names = page.locator("#sagittal-wrap .vertebra span").all_inner_texts()
        assert {"L1", "L2", "L3", "L4", "L5"} <= set(names), names

        # mouse wheel over the axial view: one slice per notch, both ways
        page.mouse.move(*_point(page, "#axial-canvas", ny / 2, nx / 2, ny, nx))
        for _ in range(3):
            page.mouse.wheel(0, 100)
        page.wait_for_function(
            f"() => document.getElementById('axial-index').textContent.startsWith('slice {first + 3} ')"
        )
        page.mouse.wheel(0, -100)
        assert _axial_slice(page) == first + 2

        # keyboard: arrows one slice, PageUp / PageDown five
        page.keyboard.press("ArrowDown")
        assert _axial_slice(page) == first + 3
        page.keyboard.press("PageUp")
        assert _axial_slice(page) == first - 2
        page.keyboard.press("PageDown")
        page.keyboard.press("ArrowUp")
        k = _axial_slice(page)
        assert k == first + 2

        # HU under the cursor is the volume's HU at that pixel
        row, col = ny // 2, nx // 2 + 5
        page.mouse.move(*_point(page, "#axial-canvas", row, col, ny, nx))
        readout = page.inner_text("#hu")
        assert readout.startswith(f"{round(float(hu[k, row, col]))} HU at slice {k}, row {row}, col {col}"), (
            readout
        )

        # zoom: Ctrl+wheel magnifies about the pointer; the readout still names the pixel under it
        before = page.locator("#axial-canvas").bounding_box()
        page.keyboard.down("Control")
        page.mouse.wheel(0, -100)
        page.mouse.wheel(0, -100)
        page.keyboard.up("Control")
        after = page.locator("#axial-canvas").bounding_box()
        assert after["width"] == pytest.approx(before["width"] * 1.25 * 1.25, rel=0.02)
        assert page.inner_text("#axial-wrap .zoom") == "1.6x"
        assert _axial_slice(page) == k  # Ctrl+wheel zooms, it does not scroll
        row2, col2 = ny // 2 - 7, nx // 2 + 3
        page.mouse.move(*_point(page, "#axial-canvas", row2, col2, ny, nx))
        assert page.inner_text("#hu").startswith(
            f"{round(float(hu[k, row2, col2]))} HU at slice {k}, row {row2}, col {col2}"
        )
        page.screenshot(path=str(ARTIFACTS / "10-axial-zoomed.png"))
        # pan: Shift+drag moves the zoomed image with the pointer, slice and window unchanged
        zoomed = page.locator("#axial-canvas").bounding_box()
        x0, y0 = _point(page, "#axial-canvas", ny / 2, nx / 2, ny, nx)
        page.keyboard.down("Shift")
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 - 30, y0 + 20, steps=4)
        page.mouse.up()
        page.keyboard.up("Shift")
        panned = page.locator("#axial-canvas").bounding_box()
        assert (panned["x"] - zoomed["x"], panned["y"] - zoomed["y"]) == pytest.approx((-30, 20), abs=1)
        assert _axial_slice(page) == k and page.inner_text("#wl") == "W 400 L 40 HU"
        page.keyboard.press("0")
        assert page.locator("#axial-canvas").bounding_box()["width"] == pytest.approx(
            before["width"], rel=0.01
        )

        # window/level: right-drag right widens the window, down raises the level; the image changes
        pixels = "() => document.getElementById('axial-canvas').toDataURL()"
        image_before = page.evaluate(pixels)
        assert page.inner_text("#wl") == "W 400 L 40 HU"
        x0, y0 = _point(page, "#axial-canvas", ny / 2, nx / 2, ny, nx)
        page.mouse.move(x0, y0)
        page.mouse.down(button="right")
        page.mouse.move(x0 + 50, y0 + 20, steps=5)
        page.mouse.up(button="right")
        assert page.inner_text("#wl") == "W 600 L 80 HU"
        assert page.evaluate(pixels) != image_before
        assert _axial_slice(page) == k  # W/L drag moves neither the slice nor the selection
        page.screenshot(path=str(ARTIFACTS / "11-window-dragged.png"))
        page.click("button[data-preset=abdomen]")
        assert page.inner_text("#wl") == "W 400 L 40 HU"

        # Slice mode: clicking the coronal selects that slice; wheel and keys move the selection too
        page.click("#mode-slice")
        target = first + 4
        page.mouse.click(*_y_of(page, "#coronal-wrap", target, nz))
        assert page.inner_text("#selection").startswith(f"Slice {target} ")
        assert _axial_slice(page) == target
        page.mouse.move(*_point(page, "#axial-canvas", ny / 2, nx / 2, ny, nx))
        page.mouse.wheel(0, -100)
        page.keyboard.press("ArrowUp")
        assert page.inner_text("#selection").startswith(f"Slice {target - 2} ")
        page.screenshot(path=str(ARTIFACTS / "12-slice-mode-scrolled.png"))
    assert not errors, errors


def _session_id(page) -> str:  # type: ignore[no-untyped-def]
    """The labelling session shown (its id is in the CSV export link)."""
    href = page.get_attribute("#csv", "href")
    return str(href).split("/api/session/")[1].split("/")[0]


def _labels(url: str, sid: str, pos: int, shape: tuple[int, int]) -> np.ndarray:
    data = httpx.get(f"{url}api/session/{sid}/labels/{pos}").content
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


def test_brush_hu_limit_undo_redo_and_unsaved_guard(server: tuple[str, object, Path]) -> None:
    url, demo, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    hu = _volume(demo)
    _, rows, cols = hu.shape
    errors: list[str] = []
    dialogs: list[tuple[str, str]] = []
    with _page(errors) as page:  # type: ignore[var-annotated]
        page.on("dialog", lambda d: (dialogs.append((d.type, d.message)), d.dismiss()))
        _open(page, url)
        page.click("#segment")  # the suggested range
        page.wait_for_function("() => document.querySelectorAll('#quant-table tbody tr').length > 0")
        sid = _session_id(page)
        k = int(page.inner_text("#slice-name").split()[-1])  # "1/5: slice 21"
        image = hu[k]
        before = _labels(url, sid, 0, (rows, cols))

        # a muscle stroke straight across the vertebral body, HU limit on (the default)
        r = int(np.argmax((image > 150).sum(axis=1)))  # the row with the most bone
        line = np.nonzero(image[r] > 150)[0]
        c0, c1 = int(line.min()) - 8, int(line.max()) + 8
        assert page.is_checked("#hu-limit") and not page.is_checked("#overwrite")
        page.check("input[name=cls][value='1']")
        page.fill("#brush-size", "1")
        page.mouse.move(*_point(page, "#ov-canvas", r, c0, rows, cols))
        page.wait_for_selector("#brush-outline:not([hidden])")
        page.mouse.down()
        page.mouse.move(*_point(page, "#ov-canvas", r, c1, rows, cols), steps=12)
        page.mouse.up()
        page.wait_for_function("() => document.getElementById('dirty').textContent !== ''")
        page.wait_for_timeout(300)
        painted = _labels(url, sid, 0, (rows, cols))
        page.screenshot(path=str(ARTIFACTS / "20-hu-limited-stroke.png"))

        seg = painted[r, c0 : c1 + 1]
        vals, old = image[r, c0 : c1 + 1], before[r, c0 : c1 + 1]
        muscle_range = (vals >= -29) & (vals <= 150)
        assert np.all(seg[vals > 150] == 0), "bone under the stroke must stay unlabelled"
        assert np.all(seg[muscle_range & (old == 0)] == 1), "muscle-range pixels are painted"
        assert np.all(seg[old > 1] == old[old > 1]), "other classes are never overwritten"
        assert np.count_nonzero(muscle_range & (old == 0)) > 0 and np.count_nonzero(vals > 150) > 5
        changed = np.argwhere(painted != before)
        assert changed.size and np.all(np.abs(changed[:, 0] - r) <= 1), "only the stroke's rows changed"

        # undo / redo with the usual keys
        page.mouse.move(*_point(page, "#ov-canvas", 5, 5, rows, cols))
        page.keyboard.press("Control+z")
        page.wait_for_timeout(400)
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), before)
        page.keyboard.press("Control+Shift+Z")
        page.wait_for_timeout(400)
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), painted)

        # asked for: with "overwrite" on and the HU limit off, the same stroke does label the bone
        page.check("#overwrite")
        page.uncheck("#hu-limit")
        page.mouse.move(*_point(page, "#ov-canvas", r, c0, rows, cols))
        page.mouse.down()
        page.mouse.move(*_point(page, "#ov-canvas", r, c1, rows, cols), steps=12)
        page.mouse.up()
        page.wait_for_timeout(400)
        forced = _labels(url, sid, 0, (rows, cols))[r, c0 : c1 + 1]
        assert np.all(forced[vals > 150] == 1) and np.all(forced[old > 1] == 1)
        page.keyboard.press("Control+z")
        page.wait_for_timeout(400)
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), painted)
        page.check("#hu-limit")
        page.uncheck("#overwrite")

        # wheel and keys page through the session's slices in the labelling view
        page.mouse.move(*_point(page, "#ov-canvas", 5, 5, rows, cols))
        page.mouse.wheel(0, 100)
        page.wait_for_function("() => document.getElementById('slice-name').textContent.startsWith('2/')")
        page.keyboard.press("ArrowUp")
        page.wait_for_function("() => document.getElementById('slice-name').textContent.startsWith('1/')")

        # re-segmenting with unsaved edits asks first; refusing keeps the session and its edits
        page.click("#back")
        page.click("#segment")
        page.wait_for_timeout(400)
        assert dialogs and dialogs[-1][0] == "confirm" and "unsaved" in dialogs[-1][1].lower(), dialogs
        assert _session_id(page) == sid
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), painted)
        page.screenshot(path=str(ARTIFACTS / "21-unsaved-guard.png"))

        # leaving the page with unsaved edits asks too (beforeunload)
        _close_with_unload(page)
    assert [d[0] for d in dialogs] == ["confirm", "beforeunload"], dialogs
    assert not errors, errors


def _nv_readout(page) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    """(HU, slice, row, col) from NiiVue's readout: "<hu> HU at slice k, row r, col c"."""
    text = page.inner_text("#nv-hu")
    value, rest = text.split(" HU at slice ")
    k, row, col = (int(part.split()[-1]) for part in rest.split(","))
    return int(float(value)), k, row, col


def _assert_axial_tile_matches(page, shot: np.ndarray, image: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector("#nv-panel[data-axial-tile]")
    tile = page.get_attribute("#nv-panel", "data-axial-tile")
    left, top, width, height = (float(x) for x in tile.split(","))
    rows, cols = image.shape
    # sample the tile at each pixel centre (nearest-neighbour rendering); drop crosshair-red pixels
    ys = np.clip((top + (np.arange(rows) + 0.5) / rows * height).astype(int), 0, shot.shape[0] - 1)
    xs = np.clip((left + (np.arange(cols) + 0.5) / cols * width).astype(int), 0, shot.shape[1] - 1)
    tile = shot[np.ix_(ys, xs)].astype(float)
    neutral = np.ptp(tile, axis=2) < 12
    seen = tile.mean(axis=2)
    expected = np.clip((image - (40 - 200)) / 400 * 255, 0, 255)  # W 400 L 40
    scores = {
        name: float(np.corrcoef(seen[neutral], view[neutral])[0, 1])
        for name, view in {
            "as is": expected, "rows mirrored": expected[::-1], "both mirrored": expected[::-1, ::-1]
        }.items()
    }  # fmt: skip
    assert scores["as is"] > 0.9 and scores["as is"] > max(scores.values()) - 1e-9, (scores, tile)
    # (left-right mirroring is not tested: the phantom is left-right symmetric)


def test_niivue_as_the_viewer_from_selection_to_save(server: tuple[str, object, Path]) -> None:
    """`?viewer=niivue` (what a browser with WebGL2 on a GPU gets): the vendored NiiVue is the
    viewer, the canvas views are hidden, and the whole flow runs on NiiVue alone: it draws the
    series the right way round, its crosshair follows the slice at the right voxel, the
    vertebrae and the range's guides are on its coronal and sagittal images, window/level, zoom,
    pan and the HU readout work on it, the session's labels are its drawing layer, HU-limited
    strokes painted on it follow the brush rules and undo, and the labels save into the site."""
    from PIL import Image

    url, demo, site = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    hu = _volume(demo)
    _, rows, cols = hu.shape
    errors: list[str] = []
    with _page(errors) as page:  # type: ignore[var-annotated]
        page.goto(f"{url}?viewer=niivue")
        page.wait_for_selector("#select-view[data-loaded]")
        page.wait_for_selector("#nv-panel[data-niivue]")
        assert page.get_attribute("#nv-panel", "data-niivue") == "0.69.0"
        assert page.get_attribute("#nv-panel", "data-gl") == "webgl2"
        # the vendored bundle, from this server: nothing else was fetched
        loaded = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
        assert f"{url}static/vendor/niivue/niivue.js" in loaded, loaded
        assert all(name.startswith(url) for name in loaded), loaded
        # NiiVue is the viewer: the canvas views are hidden, NiiVue's panel is on top
        assert page.locator("#axial-canvas").is_hidden() and page.locator("#coronal-canvas").is_hidden()
        assert page.evaluate("() => document.querySelector('main').firstElementChild.id") == "nv-panel"

        # the canvas is drawn: a CT, not a blank or uniform frame
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#nv-canvas").screenshot())).convert("RGB"))
        grey = shot.mean(axis=2)
        assert grey.std() > 20 and len(np.unique(grey.astype(np.uint8))) > 40, (grey.std(), grey.max())
        page.locator("#nv-canvas").screenshot(path=str(ARTIFACTS / "30-niivue-series.png"))
        # ... shown the right way round: NiiVue's axial tile matches the slice (radiological: row 0
        # anterior at the top, col 0 the patient's right at the left) better than any mirror of it

        # NiiVue's crosshair follows the workbench's slice (Down arrow x3): same slice, and the
        # HU it reads there is the volume's (a flipped axis would read another voxel)
        first = _axial_slice(page)
        for _ in range(3):
            page.keyboard.press("ArrowDown")
        page.wait_for_function(
            f"() => document.getElementById('nv-hu').textContent.includes('slice {first + 3},')"
        )
        value, k, row, col = _nv_readout(page)
        assert k == first + 3
        assert value == round(float(hu[k, row, col])), (value, hu[k, row, col])
        assert hu[k, row, col] > 150, "the crosshair starts on the spine"
        # ... and the image is shown the right way round: NiiVue's axial tile matches the slice
        # (radiological: row 0 anterior at the top, col 0 the patient's right at the left) better
        # than a mirror of it (a consistent flip would pass the HU check above)
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#nv-canvas").screenshot())).convert("RGB"))
        _assert_axial_tile_matches(page, shot, hu[k])

        # the suggested vertebrae are labelled on NiiVue's coronal and sagittal images, where
        # NiiVue puts those slices: a click on the sagittal "L3" lands in L3
        names = page.locator("#nv-overlay .vertebra[data-plane='2'] span").all_inner_texts()
        assert {"L1", "L2", "L3", "L4", "L5"} <= set(names), names
        assert len(page.locator("#nv-overlay .vertebra[data-plane='1']").all()) == len(names)
        l3_first, l3_last = demo.l3  # type: ignore[attr-defined]
        label = page.locator("#nv-overlay .vertebra[data-plane='2']", has_text="L3").bounding_box()
        page.mouse.click(label["x"] + label["width"] / 2, label["y"] + label["height"] / 2)
        clicked = _axial_slice(page)
        assert l3_first <= clicked <= l3_last, (clicked, demo.l3)  # type: ignore[attr-defined]
        page.locator("#nv-panel").screenshot(path=str(ARTIFACTS / "34-niivue-vertebrae.png"))
        k = clicked

        # the range's guides are dragged on NiiVue's sagittal image: the start guide dropped on
        # its "L1" puts the selection's start in L1 (the slices the series' meta gives L1)
        key = page.get_attribute("#select-view", "data-loaded")
        meta = httpx.get(f"{url}api/series/{key}/meta").json()
        (l1_range,) = [(v["start"], v["end"]) for v in meta["suggestion"]["vertebrae"] if v["name"] == "L1"]
        guide = page.locator("#nv-overlay .guide.start[data-plane='2']").bounding_box()
        l1 = page.locator("#nv-overlay .vertebra[data-plane='2']", has_text="L1").bounding_box()
        page.mouse.move(guide["x"] + guide["width"] / 2, guide["y"] + guide["height"] / 2)
        page.mouse.down()
        page.mouse.move(guide["x"] + guide["width"] / 2, l1["y"] + l1["height"] / 2, steps=6)
        page.mouse.up()
        selected = [int(x) for x in page.inner_text("#selection").split()[1].split("-")]
        assert min(l1_range) <= min(selected) <= max(l1_range), (selected, l1_range)
        moved_guide = page.locator("#nv-overlay .guide.start[data-plane='2']").bounding_box()
        y = moved_guide["y"] + moved_guide["height"] / 2
        assert l1["y"] <= y <= l1["y"] + l1["height"], (y, l1)
        assert _axial_slice(page) != clicked  # the axial view follows the dragged guide
        page.locator("#nv-panel").screenshot(path=str(ARTIFACTS / "35-niivue-guide-dragged.png"))
        page.click("button[data-preset=abdomen]")  # (the guide drag set no window: nothing to redraw)
        page.mouse.click(label["x"] + label["width"] / 2, label["y"] + label["height"] / 2)  # back to L3
        k = _axial_slice(page)

        # NiiVue's controls drive the workbench: its wheel over the axial image moves the
        # workbench's slice (and its readout follows), a right-drag on it is the window/level
        tile = [float(x) for x in page.get_attribute("#nv-panel", "data-axial-tile").split(",")]
        box = page.locator("#nv-canvas").bounding_box()
        centre = (box["x"] + tile[0] + tile[2] / 2, box["y"] + tile[1] + tile[3] / 2)
        page.mouse.move(*centre)
        for _ in range(2):
            page.mouse.wheel(0, 100)
        page.wait_for_function(
            f"() => !document.getElementById('axial-index').textContent.startsWith('slice {k} ')"
        )
        moved = _axial_slice(page)
        assert abs(moved - k) == 2, (k, moved)
        assert _nv_readout(page)[1] == moved
        image_before = page.locator("#nv-canvas").screenshot()
        refreshes = int(page.get_attribute("#nv-panel", "data-window-refreshes"))
        page.mouse.move(*centre)
        page.mouse.down(button="right")
        page.mouse.move(centre[0] + 50, centre[1] + 20, steps=5)
        page.mouse.up(button="right")
        assert page.inner_text("#wl") == "W 600 L 80 HU"
        # NiiVue redraws its volume once for the whole drag (each redraw is seconds on a software
        # GL), with the window the drag ended on
        page.wait_for_selector("#nv-panel[data-window='600,80']")
        assert int(page.get_attribute("#nv-panel", "data-window-refreshes")) == refreshes + 1
        assert page.locator("#nv-canvas").screenshot() != image_before
        assert _axial_slice(page) == moved  # a window drag moves no slice
        page.click("button[data-preset=abdomen]")
        assert page.inner_text("#wl") == "W 400 L 40 HU"
        page.wait_for_selector("#nv-panel[data-window='400,40']")

        # segment: the drawing layer holds every session slice's labels
        page.click("#segment")
        page.wait_for_function("() => document.querySelectorAll('#quant-table tbody tr').length > 0")
        sid = _session_id(page)
        n = page.locator("#quant-table tbody tr").count()
        counts = lambda: [int(x) for x in page.get_attribute("#nv-panel", "data-draw-counts").split(",")]  # noqa: E731
        labels = [_labels(url, sid, i, (rows, cols)) for i in range(n)]
        assert counts() == [sum(int((lab == c).sum()) for lab in labels) for c in (1, 2, 3)]
        assert counts()[0] > 0
        page.locator("#nv-canvas").screenshot(path=str(ARTIFACTS / "31-niivue-mask.png"))

        # an HU-limited muscle stroke across the spine, painted on NiiVue's axial tile (labelling:
        # the session's slice alone, in a taller frame)
        assert "labelling" in (page.get_attribute("#nv-panel .nv-box", "class") or "")
        assert page.locator("#ct-canvas").is_hidden()
        page.screenshot(path=str(ARTIFACTS / "31-niivue-labelling-page.png"), full_page=True)
        k0 = int(page.inner_text("#slice-name").split()[-1])
        image = hu[k0]
        r = int(np.argmax((image > 150).sum(axis=1)))
        line = np.nonzero(image[r] > 150)[0]
        c0, c1 = int(line.min()) - 8, int(line.max()) + 8
        page.check("input[name=cls][value='1']")
        page.fill("#brush-size", "1")

        # the stroke follows the brush rules (bone stays unlabelled, other classes kept, only the
        # stroke's rows change), is one undo step, and the drawing layer follows
        page.locator("#nv-canvas").scroll_into_view_if_needed()
        page.wait_for_selector("#nv-panel[data-axial-tile]")
        tile = [float(x) for x in page.get_attribute("#nv-panel", "data-axial-tile").split(",")]
        box = page.locator("#nv-canvas").bounding_box()

        def on_tile(row: float, col: float) -> tuple[float, float]:
            return (
                box["x"] + tile[0] + (col + 0.5) / cols * tile[2],
                box["y"] + tile[1] + (row + 0.5) / rows * tile[3],
            )

        # the overlay's controls reach NiiVue's drawing layer: a SAT pixel is drawn SAT-coloured,
        # and grey once SAT is hidden (opacity 100% to see it plainly)
        from scipy.ndimage import binary_erosion

        inner = np.argwhere(binary_erosion(labels[0] == 2))  # SAT is thin at this size
        sat_r, sat_c = (int(v) for v in inner[len(inner) // 2])

        def colour_at(row: int, col: int) -> np.ndarray:
            shot = np.asarray(Image.open(io.BytesIO(page.locator("#nv-canvas").screenshot())).convert("RGB"))
            x, y = on_tile(row, col)
            return shot[int(y - box["y"]), int(x - box["x"])].astype(int)

        set_opacity = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }"  # no scrolling
        page.locator("#opacity").evaluate(set_opacity, "100")
        page.wait_for_selector("#nv-panel[data-overlay='1.00:123']")
        shown = colour_at(sat_r, sat_c)
        assert shown[0] > shown[2] + 60 and shown[1] > shown[2] + 60, shown  # SAT yellow
        page.locator(".visible[value='2']").evaluate("(el) => el.click()")
        page.wait_for_selector("#nv-panel[data-overlay='1.00:13']")
        hidden = colour_at(sat_r, sat_c)
        assert abs(hidden[0] - hidden[2]) < 12 and abs(hidden[1] - hidden[2]) < 12, hidden  # the CT, grey
        page.locator(".visible[value='2']").evaluate("(el) => el.click()")
        page.locator("#opacity").evaluate(set_opacity, "50")
        page.wait_for_selector("#nv-panel[data-overlay='0.50:123']")

        # the brush outline follows the pointer on NiiVue's tile, at the brush's size in pixels
        outline = page.locator("#nv-brush-outline")
        for size in (4, 1):
            page.fill("#brush-size", str(size))
            page.mouse.move(*on_tile(r - 20, c0))
            page.mouse.move(*on_tile(r, c0))
            assert outline.is_visible() and "c1" in (outline.get_attribute("class") or "")
            drawn = outline.bounding_box()
            # its content box is the brush (the 1 px border is drawn outside it)
            assert abs(drawn["width"] - 2 - 2 * size * tile[2] / cols) < 1.0, (size, drawn, tile)
            x, y = on_tile(r, c0)
            assert abs(drawn["x"] + drawn["width"] / 2 - x) < 1.5, (drawn, x)
            assert abs(drawn["y"] + drawn["height"] / 2 - y) < 1.5, (drawn, y)
        page.mouse.move(box["x"] - 20, box["y"] - 20)
        assert not outline.is_visible()
        before = labels[0]
        page.mouse.move(*on_tile(r, c0))
        page.mouse.down()
        page.mouse.move(*on_tile(r, c1), steps=12)
        page.mouse.up()
        page.wait_for_timeout(400)
        on_nv = _labels(url, sid, 0, (rows, cols))
        page.locator("#nv-canvas").screenshot(path=str(ARTIFACTS / "33-niivue-painted-on-tile.png"))
        seg, vals, old = on_nv[r, c0 : c1 + 1], image[r, c0 : c1 + 1], before[r, c0 : c1 + 1]
        muscle_range = (vals >= -29) & (vals <= 150)
        assert np.all(seg[vals > 150] == 0), "bone under the stroke must stay unlabelled"
        assert np.all(seg[muscle_range & (old == 0)] == 1), "muscle-range pixels are painted"
        assert np.all(seg[old > 1] == old[old > 1]), "other classes are never overwritten"
        changed = np.argwhere(on_nv != before)
        assert changed.size and np.all(np.abs(changed[:, 0] - r) <= 1), "only the stroke's rows changed"
        assert counts() == [sum(int((lab == c).sum()) for lab in [on_nv, *labels[1:]]) for c in (1, 2, 3)]
        assert page.inner_text("#dirty") != ""
        page.keyboard.press("Control+z")
        page.wait_for_timeout(400)
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), before)

        # zoom on NiiVue (Ctrl+wheel, about its crosshair): the header's HU readout and the brush
        # follow it. Independent of NiiVue's mapping: the crosshair's voxel stays put on the
        # screen, and 20 screen px from it is 20 / (scale x zoom) image pixels
        _, k_nv, row0, col0 = _nv_readout(page)
        x0, y0 = on_tile(row0, col0)

        def readout_at(x: float, y: float) -> tuple[int, int, int, int]:
            page.mouse.move(x, y)
            value, rest = page.inner_text("#hu").split(" HU at slice ")
            k_at, row_at, col_at = (int(part.split()[-1]) for part in rest.split(","))
            return int(float(value)), k_at, row_at, col_at

        assert readout_at(x0, y0)[1:] == (k_nv, row0, col0)
        page.mouse.move(x0, y0)
        page.keyboard.down("Control")
        page.mouse.wheel(0, -100)
        page.mouse.wheel(0, -100)
        page.keyboard.up("Control")
        page.wait_for_selector("#nv-panel[data-zoom='1.563']")
        assert page.inner_text("#nv-zoom") == "1.6x"
        page.locator("#nv-canvas").screenshot(path=str(ARTIFACTS / "36-niivue-zoomed.png"))
        zoom, scale = 1.5625, tile[2] / cols
        assert readout_at(x0, y0)[1:] == (k_nv, row0, col0)
        value, k_at, row_at, col_at = readout_at(x0 + 20, y0 + 10)
        assert k_at == k_nv and abs(col_at - (col0 + 20 / (scale * zoom))) <= 1, (col_at, col0)
        assert abs(row_at - (row0 + 10 / (scale * zoom))) <= 1, (row_at, row0)
        assert value == round(float(hu[k_at, row_at, col_at]))
        # a one-pixel free-hand dab there paints that pixel
        for box_id in ("hu-limit", "overwrite"):  # clicked in the page: no scrolling, NiiVue stays put
            page.locator(f"#{box_id}").evaluate("(el) => el.click()")
        assert not page.is_checked("#hu-limit") and page.is_checked("#overwrite")
        page.mouse.move(x0 + 20, y0 + 10)
        page.mouse.down()
        page.mouse.up()
        page.wait_for_timeout(400)
        dabbed = _labels(url, sid, 0, (rows, cols))
        changed = np.argwhere(dabbed != before)
        assert dabbed[row_at, col_at] == 1, changed
        assert changed.size and np.all(np.abs(changed - [row_at, col_at]) <= 1), changed
        page.keyboard.press("Control+z")
        page.wait_for_timeout(400)
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), before)
        # Shift+drag pans: the voxel under the pointer at the start follows the pointer
        col_far = readout_at(x0 + 30, y0 + 12)[3]
        assert abs(col_far - col0) >= 3, (col_far, col0)  # before the pan, another voxel is there
        page.mouse.move(x0, y0)
        page.keyboard.down("Shift")
        page.mouse.down()
        page.mouse.move(x0 + 30, y0 + 12, steps=5)
        page.mouse.up()
        page.keyboard.up("Shift")
        _, k_at, row_at, col_at = readout_at(x0 + 30, y0 + 12)
        assert k_at == k_nv and abs(row_at - row0) <= 1 and abs(col_at - col0) <= 1, (
            row_at,
            col_at,
            row0,
            col0,
        )
        assert np.array_equal(_labels(url, sid, 0, (rows, cols)), before)  # a pan paints nothing
        page.locator("#nv-canvas").screenshot(path=str(ARTIFACTS / "37-niivue-panned.png"))
        page.keyboard.press("0")  # the pointer is on NiiVue: its zoom and pan reset
        page.wait_for_selector("#nv-panel[data-zoom='1.000']")
        assert readout_at(x0, y0)[1:] == (k_nv, row0, col0)

        # save: the session's labels, as NiiVue showed them, come back through the site loader
        session_labels = [_labels(url, sid, i, (rows, cols)) for i in range(n)]
        page.fill("#height", "1.70")
        page.click("#save")
        page.wait_for_function("() => document.getElementById('save-status').textContent.startsWith('Saved')")
        page.screenshot(path=str(ARTIFACTS / "38-niivue-saved.png"))
    assert not errors, errors
    from common.dataset import load_site, load_slice

    dataset = load_site(site)
    assert len(dataset.rows) == n
    for i in range(n):
        assert np.array_equal(load_slice(dataset, i).label, session_labels[i]), i


def test_niivue_is_shown_where_webgl2_runs_on_a_gpu_and_not_on_a_software_gl(
    server: tuple[str, object, Path],
) -> None:
    """The viewer choice (static/viewer_choice.js): NiiVue where WebGL2 has a GPU behind it, the
    canvas views alone on a software GL (where a NiiVue window change takes seconds), and
    ``?viewer=`` decides when given. This machine's headless chromium draws WebGL2 in software."""
    url, _, _ = server
    errors: list[str] = []
    with _page(errors) as page:  # type: ignore[var-annotated]
        page.goto(url)
        page.wait_for_selector("#select-view[data-loaded]")
        choose = """([param, renderer]) => import('/static/viewer_choice.js')
            .then((m) => m.chooseViewer(param, renderer).viewer)"""
        cases = {
            (None, "ANGLE (NVIDIA, NVIDIA GeForce RTX 3060 Direct3D11 vs_5_0 ps_5_0, D3D11)"): "niivue",
            (None, "Apple M2"): "niivue",
            (None, "Mesa Intel(R) UHD Graphics 620 (KBL GT2)"): "niivue",
            (
                None,
                "ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero)), SwiftShader driver)",
            ): "canvas",
            (None, "llvmpipe (LLVM 15.0.6, 256 bits)"): "canvas",
            (
                None,
                "ANGLE (Microsoft, Microsoft Basic Render Driver Direct3D11 vs_5_0 ps_5_0, D3D11)",
            ): "canvas",
            (None, None): "canvas",
            ("niivue", "llvmpipe (LLVM 15.0.6, 256 bits)"): "niivue",
            ("canvas", "Apple M2"): "canvas",
        }
        for (param, renderer), viewer in cases.items():
            assert page.evaluate(choose, [param, renderer]) == viewer, (param, renderer)

        # here: a software GL, so the canvas views alone, saying why, and NiiVue never loaded
        assert page.get_attribute("body", "data-viewer") == "canvas"
        reason = page.get_attribute("body", "data-viewer-reason") or ""
        assert "software" in reason or "no WebGL2" in reason, reason
        assert page.locator("#nv-panel").is_hidden()
        loaded = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
        assert not any("niivue" in name for name in loaded), loaded
        page.goto(f"{url}?viewer=canvas")
        page.wait_for_selector("#select-view[data-loaded]")
        assert page.get_attribute("body", "data-viewer") == "canvas"
    assert not errors, errors
