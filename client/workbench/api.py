"""HTTP routes of the workbench (FastAPI). Thin: each route calls ``state``, ``render``, ``segment``
or ``site_save``.

Every answer is JSON or the file asked for: a known problem is a ``{"detail": ...}`` with its
status (403 outside the folder, 404 unknown, 400/422 bad input, 413 body too large:
``body_limit``), and an unexpected error is a 500 ``{"detail": ...}`` whose traceback goes to
this machine's log, never a bare 500.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from common.cutoffs import CutoffSet
from common.errors import SarcofedError
from common.reformat import orientation_letters
from protocols.protocol import HuRanges

from . import render, segment, site_save
from .body_limit import MAX_BODY_BYTES, BodyLimit
from .state import OutsideFolderError, Session, SliceLabels, WorkbenchState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class SelectionBody(BaseModel):
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class SaveBody(BaseModel):
    height_m: float | None = Field(default=None, gt=0.5, lt=2.8)
    sex: str | None = Field(default=None, pattern="^[MF]?$")


def _selection(state: WorkbenchState, key: str, start: int, end: int) -> tuple[Any, list[int]]:
    volume, _ = state.volume(key)
    lo, hi = sorted((start, end))
    if hi >= volume.shape[0]:
        raise HTTPException(422, f"slice {hi} is outside this series (0..{volume.shape[0] - 1})")
    return volume, list(range(lo, hi + 1))


def create_app(
    state: WorkbenchState, *, allowed_hosts: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The workbench web app serving ``state`` (one folder, optional site folder and model).

    Request bodies over ``max_bytes`` are refused (413) before they are read.
    """
    app = FastAPI(title="sarcofed site workbench", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "testserver"]
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def _unexpected(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("workbench: %s %s failed", request.method, request.url.path)
            return JSONResponse(
                {
                    "detail": f"unexpected error ({type(exc).__name__}: {exc}); nothing more was done. "
                    "The workbench's log on this machine has the details: please report it."
                },
                status_code=500,
            )

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(OutsideFolderError)
    async def _outside(_: Request, exc: OutsideFolderError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(KeyError)
    async def _unknown(_: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    @app.exception_handler(FileNotFoundError)
    async def _missing(_: Request, exc: FileNotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(SarcofedError)
    async def _sarcofed(_: Request, exc: SarcofedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(site_save.SaveError)
    async def _save(_: Request, exc: site_save.SaveError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "folder": str(state.root),
            "site": str(state.site_dir) if state.site_dir else None,
            "method": "model" if state.model_path else "fallback",
            "method_label": f"study model {state.model_path.name}"
            if state.model_path
            else segment.FALLBACK_LABEL,
            "cutoff_sets": [c.value for c in CutoffSet],
            "presets": {p.value: asdict(w) for p, w in render.PRESETS.items()},
            # the brush's default HU limit per canonical class (the Alberta protocol's ranges)
            "brush_hu": {
                "1": list(HuRanges().muscle),
                "2": list(HuRanges().subcutaneous_fat),
                "3": list(HuRanges().visceral_fat),
            },
        }

    @app.get("/api/series")
    def list_series(path: str = "") -> dict[str, Any]:
        listing = state.scan(path)
        return {
            "folder": state.relative(listing.folder) if listing.folder != state.root else ".",
            "series": [
                {"key": s.key, "uid": s.series_uid, "description": s.description, "count": s.count}
                for s in listing.series
            ],
            "skipped": [{"file": state.relative(s.path), "reason": s.reason} for s in listing.skipped],
        }

    @app.get("/api/series/{key}/meta")
    def meta(key: str) -> dict[str, Any]:
        volume, suggestion = state.volume(key)
        nz, ny, nx = volume.shape
        return {
            "key": key,
            "uid": volume.series.series_uid,
            "description": volume.series.description,
            "shape": [nz, ny, nx],
            "spacing_mm": list(volume.spacing_mm),
            "positions_mm": list(volume.positions_mm),
            "files": [state.relative(f) for f in volume.files],
            "note": volume.note,
            "height_m": volume.height_m,
            "sex": volume.sex,
            "orientation": orientation_letters(volume.series.slices[0].orientation),
            "spine_row": suggestion.spine_row if suggestion.spine_row is not None else ny // 2,
            "spine_column": suggestion.spine_column if suggestion.spine_column is not None else nx // 2,
            "suggestion": {
                "start": suggestion.start,
                "end": suggestion.end,
                "anchor": suggestion.anchor,
                "note": suggestion.note,
                "vertebrae": [asdict(v) for v in suggestion.vertebrae],
            },
        }

    @app.get("/api/series/{key}/{plane}.png")
    def view(key: str, plane: str, index: int, preset: str = "abdomen") -> Response:
        if plane not in ("axial", "coronal", "sagittal"):
            raise HTTPException(404, f"unknown plane {plane!r}; use axial, coronal or sagittal")
        volume, _ = state.volume(key)
        try:
            data = render.view_png(volume, plane, index, preset)  # type: ignore[arg-type]
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return Response(data, media_type="image/png")

    @app.get("/api/series/{key}/download")
    def download(key: str, start: int, end: int) -> Response:
        volume, indices = _selection(state, key, start, end)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for k in indices:
                archive.write(volume.files[k], arcname=state.relative(volume.files[k]))
        name = f"selected-{indices[0]:04d}-{indices[-1]:04d}.zip"
        return Response(
            buffer.getvalue(),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post("/api/series/{key}/segment")
    def segment_selection(key: str, body: SelectionBody) -> dict[str, Any]:
        volume, indices = _selection(state, key, body.start, body.end)
        images = [volume.hu[k] for k in indices]
        if state.model_path is not None:
            masks = segment.model_presegment(state.model_path, images)
            method, label = "model", f"study model {state.model_path.name}"
        else:
            spacing = (volume.spacing_mm[1], volume.spacing_mm[2])
            masks = [segment.threshold_presegment(hu, spacing) for hu in images]
            method, label = "fallback", segment.FALLBACK_LABEL
        slices = [
            SliceLabels(
                file=volume.files[k],
                index=k,
                hu=volume.hu[k],
                spacing_mm=(volume.spacing_mm[1], volume.spacing_mm[2]),
                labels=mask.astype(np.uint8),
            )
            for k, mask in zip(indices, masks, strict=True)
        ]
        session = state.new_session(
            Session("", volume.series, method, label, slices, volume.height_m, volume.sex)
        )
        return {
            "session": session.id,
            "method": method,
            "method_label": label,
            "height_m": volume.height_m,
            "sex": volume.sex,
            "slices": [
                {
                    "index": s.index,
                    "file": state.relative(s.file),
                    "rows": s.hu.shape[0],
                    "cols": s.hu.shape[1],
                    "spacing_mm": list(s.spacing_mm),
                }
                for s in slices
            ],
        }

    def _slice(sid: str, position: int) -> SliceLabels:
        session = state.session(sid)
        if not 0 <= position < len(session.slices):
            raise HTTPException(
                404, f"slice {position} is not in this session (0..{len(session.slices) - 1})"
            )
        return session.slices[position]

    @app.get("/api/session/{sid}/image/{position}.png")
    def session_image(sid: str, position: int, preset: str = "abdomen") -> Response:
        try:
            return Response(render.slice_png(_slice(sid, position).hu, preset), media_type="image/png")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/api/session/{sid}/labels/{position}")
    def get_labels(sid: str, position: int) -> Response:
        return Response(_slice(sid, position).labels.tobytes(), media_type="application/octet-stream")

    @app.put("/api/session/{sid}/labels/{position}")
    async def put_labels(sid: str, position: int, request: Request) -> dict[str, Any]:
        item = _slice(sid, position)
        data = np.frombuffer(await request.body(), dtype=np.uint8)
        if data.size != item.labels.size:
            raise HTTPException(
                422, f"expected {item.labels.size} label bytes (rows x cols), got {data.size}"
            )
        if data.size and int(data.max()) > 3:
            raise HTTPException(422, f"label value {int(data.max())} is not a canonical class (0-3)")
        item.labels = data.reshape(item.labels.shape).copy()
        return {"ok": True, "pixels": int(np.count_nonzero(item.labels))}

    def _quant(sid: str, height_m: float | None, sex: str | None, cutoff: str) -> list[segment.SliceQuant]:
        session = state.session(sid)
        names = [state.relative(s.file) for s in session.slices]
        try:
            return segment.quantify(session, names, height_m=height_m, sex=sex or None, cutoff_set=cutoff)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/api/session/{sid}/quant")
    def quant(
        sid: str, height_m: float | None = None, sex: str = "", cutoff: str = "prado2008"
    ) -> dict[str, Any]:
        return {"cutoff": cutoff, "rows": [asdict(r) for r in _quant(sid, height_m, sex, cutoff)]}

    @app.get("/api/session/{sid}/quant.csv")
    def quant_csv(
        sid: str, height_m: float | None = None, sex: str = "", cutoff: str = "prado2008"
    ) -> Response:
        rows = _quant(sid, height_m, sex, cutoff)
        text = segment.quant_csv(rows, height_m=height_m, sex=sex or None, cutoff_set=cutoff)
        return Response(
            text,
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="l3-quant.csv"'},
        )

    @app.post("/api/session/{sid}/save")
    def save(sid: str, body: SaveBody) -> dict[str, Any]:
        if state.site_dir is None:
            raise HTTPException(409, "no site folder: restart the workbench with --site DIR to save labels")
        session = state.session(sid)
        with state.lock:
            written = site_save.save_to_site(
                session,
                state.site_dir,
                height_m=body.height_m,
                sex=body.sex or None,
                mask_format=state.mask_format,
            )
        session.saved = written
        return {"site": str(state.site_dir), "written": written}

    # ---- viewer data: raw HU for the browser's own rendering (window/level, HU readout, brush limit)

    @app.get("/api/series/{key}/volume.i16")
    def volume_hu(key: str) -> Response:
        """The whole series as little-endian int16 HU, (z, y, x) C order; the shape is in /meta."""
        volume, _ = state.volume(key)
        return Response(hu_int16(volume.hu), media_type="application/octet-stream")

    @app.get("/api/session/{sid}/hu/{position}.i16")
    def session_hu(sid: str, position: int) -> Response:
        """One session slice as little-endian int16 HU, (rows, cols) C order."""
        return Response(hu_int16(_slice(sid, position).hu), media_type="application/octet-stream")

    return app


def hu_int16(hu: np.ndarray) -> bytes:
    """HU rounded and clipped to int16, little-endian bytes (CT HU fits; anything beyond is clipped)."""
    return np.clip(np.rint(hu), -32768, 32767).astype("<i2").tobytes()
