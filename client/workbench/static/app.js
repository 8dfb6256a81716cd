// sarcofed site workbench: L3 selection (axial + coronal + sagittal with guide lines) and labelling.
// Plain JS (ES modules: this file and viewport.js), no external resources. Everything talks to the local server under /api.
// The browser renders every view itself from raw HU (int16), so window/level, the HU readout
// and the HU-limited brush all work on the real values.
//
// Mouse (every view): wheel = next/previous slice of that view, Ctrl+wheel = zoom,
// right-drag = window/level, middle-drag or Shift+drag = pan, double-click = reset zoom.
// Keys: Up/Down or PageUp/PageDown = slice (1 / 5), +/- zoom, 0 reset view,
// Ctrl+Z undo, Ctrl+Shift+Z or Ctrl+Y redo, B brush, E eraser, 1-3 class, [ ] brush size.
import { greyImage, hoveredViewport, makeViewport, setLetters, stageFraction } from "./viewport.js";
import { chooseViewer, webgl2Renderer } from "./viewer_choice.js";

const $ = (id) => document.getElementById(id);
const COLOURS = { 1: [230, 60, 60], 2: [245, 200, 40], 3: [40, 190, 170] };
const CLASS_NAMES = { 1: "Muscle", 2: "SAT", 3: "VAT" };
const PAGE = 5;
// The viewer: NiiVue (nvview.js, loaded only then) where the browser has WebGL2 on a GPU or with
// `?viewer=niivue`, else the canvas views (viewer_choice.js; `?viewer=canvas`: always them).
const VIEWER = chooseViewer(new URLSearchParams(window.location.search).get("viewer"), webgl2Renderer());
const NIIVUE = VIEWER.viewer === "niivue";
document.body.dataset.viewer = VIEWER.viewer;
document.body.dataset.viewerReason = VIEWER.reason;

const S = {
  info: null, key: null, meta: null, vol: null, mode: "range",
  wl: { width: 400, level: 40 },
  start: 0, end: 0, cursor: 0, row: 0, col: 0,
  session: null, pos: 0, labels: [], hu: [], undo: [], redo: [], painting: false, dirty: false,
  nv: null, nvHovered: false,
};

async function api(path, options) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return res;
}
function status(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "muted";
}
const labelling = () => !$("label-view").hidden && S.session !== null;

// ------------------------------------------------------------------ window / level
// A window change redraws NiiVue's whole volume (seconds on a software GL): while the window
// changes (a drag, keys), NiiVue waits, and takes the latest window once it has settled.
const NV_WINDOW_SETTLE_MS = 250;
const nvWindowLabel = () => `${Math.round(S.wl.width)},${Math.round(S.wl.level)}`; // #nv-panel[data-window]
let nvWindowTimer = null;
function nvWindowLater() {
  clearTimeout(nvWindowTimer);
  nvWindowTimer = setTimeout(() => {
    if (!S.nv) return;
    const panel = $("nv-panel");
    if (S.nv.setWindow(S.wl)) panel.dataset.windowRefreshes = String(Number(panel.dataset.windowRefreshes || 0) + 1);
    panel.dataset.window = nvWindowLabel();
  }, NV_WINDOW_SETTLE_MS);
}
function showWindow() {
  if (S.nv) nvWindowLater();
  $("wl").textContent = `W ${Math.round(S.wl.width)} L ${Math.round(S.wl.level)} HU`;
  for (const b of document.querySelectorAll(".preset")) {
    const p = S.info && S.info.presets[b.dataset.preset];
    b.classList.toggle("active", !!p && p.width === S.wl.width && p.level === S.wl.level);
  }
}
function redrawAll() {
  showWindow();
  if (labelling()) drawCT(); else if (S.vol) { drawAxial(); drawReformats(); }
}

const VIEWS = {};
function viewport(wrapId, opts) {
  VIEWS[wrapId] = makeViewport($(wrapId), {
    windowDrag: (dx, dy) => {
      S.wl.width = Math.max(1, S.wl.width + dx * 4);
      S.wl.level += dy * 2;
      redrawAll();
    },
    leave: () => { $("hu").textContent = ""; },
    ...opts,
  });
  return VIEWS[wrapId];
}
const grey = (ctx, width, height, huAt) => greyImage(ctx, width, height, huAt, S.wl);
function setAspect(wrapId, width, heightRatio) { VIEWS[wrapId].setHeight(width * heightRatio); }

// ------------------------------------------------------------------ selection view
function nz() { return S.meta ? S.meta.shape[0] : 1; }
function clamp(k) { return Math.max(0, Math.min(nz() - 1, k)); }
function huVol(z, y, x) { const [, ny, nx] = S.meta.shape; return S.vol[(z * ny + y) * nx + x]; }

function drawAxial() {
  const [, ny, nx] = S.meta.shape, c = $("axial-canvas"), off = S.cursor * ny * nx;
  c.width = nx; c.height = ny;
  grey(c.getContext("2d"), nx, ny, (i) => S.vol[off + i]);
  $("axial-index").textContent = `slice ${S.cursor} / ${nz() - 1} (z ${S.meta.positions_mm[S.cursor].toFixed(1)} mm)`;
  if (S.nv) nvCursor(S.cursor);
}
function drawReformats() {
  const [z, ny, nx] = S.meta.shape;
  const cor = $("coronal-canvas"), sag = $("sagittal-canvas");
  cor.width = nx; cor.height = z; sag.width = ny; sag.height = z;
  grey(cor.getContext("2d"), nx, z, (i) => huVol(Math.floor(i / nx), S.row, i % nx));
  grey(sag.getContext("2d"), ny, z, (i) => huVol(Math.floor(i / ny), i % ny, S.col));
  $("coronal-index").textContent = `row ${S.row}`;
  $("sagittal-index").textContent = `column ${S.col}`;
  placeCross();
}
function placeCross() {
  if (!S.meta) return;
  const [, ny, nx] = S.meta.shape;
  $("cross-h").style.top = `${((S.row + 0.5) / ny) * 100}%`;
  $("cross-v").style.left = `${((S.col + 0.5) / nx) * 100}%`;
}
function layoutSelection() {
  const [, ny, nx] = S.meta.shape, [dz, dy, dx] = S.meta.spacing_mm, W = 360;
  setAspect("axial-wrap", W, (ny * dy) / (nx * dx));
  setAspect("coronal-wrap", W, (nz() * dz) / (nx * dx));
  setAspect("sagittal-wrap", W, (nz() * dz) / (ny * dy));
  for (const id of ["axial", "coronal", "sagittal"]) setLetters($(`${id}-wrap`), S.meta.orientation[id]);
  for (const id of ["axial-wrap", "coronal-wrap", "sagittal-wrap"]) VIEWS[id].reset();
  drawVertebrae();
}
function drawVertebrae() {
  for (const wrap of [$("coronal-wrap"), $("sagittal-wrap")]) {
    const stage = wrap.querySelector(".stage");
    stage.querySelectorAll(".vertebra").forEach((x) => x.remove());
    for (const v of S.meta.suggestion.vertebrae) {
      const el = document.createElement("div");
      el.className = "vertebra";
      el.style.top = `${(v.start / nz()) * 100}%`;
      el.style.height = `${((v.end - v.start + 1) / nz()) * 100}%`;
      el.innerHTML = `<span>${v.name}</span>`;
      stage.appendChild(el);
    }
  }
}

// Move the axial cursor; in Slice mode the selection follows it.
function setCursor(k) {
  S.cursor = clamp(k);
  if (S.mode === "slice") S.start = S.end = S.cursor;
  placeGuides(); drawAxial();
}

function ensureGuides(wrap) {
  const stage = wrap.querySelector(".stage");
  if (stage.querySelector(".guide")) return;
  for (const which of ["start", "end"]) {
    const g = document.createElement("div");
    g.className = `guide ${which}`;
    g.dataset.which = which;
    g.innerHTML = `<span>${which}</span>`;
    stage.appendChild(g);
    g.addEventListener("pointerdown", (ev) => {
      if (ev.button === 0 && !ev.shiftKey) startDrag(ev, (y) => sliceAt(wrap, y), which, ev.currentTarget);
    });
  }
  const band = document.createElement("div"); band.className = "band"; stage.appendChild(band);
  const cur = document.createElement("div"); cur.className = "cursor"; stage.appendChild(cur);
  stage.querySelector("canvas").addEventListener("click", (ev) => {
    if (ev.shiftKey) return;
    setCursor(sliceAt(wrap, ev.clientY));
  });
}
function sliceAt(wrap, clientY) {
  const rect = wrap.querySelector(".stage").getBoundingClientRect();
  return clamp(Math.floor(((clientY - rect.top) / rect.height) * nz()));
}
// Drag a range guide: `sliceOf(clientY)` is the slice under the pointer; `target` keeps the
// pointer (an element the redraws during the drag do not replace).
function startDrag(ev, sliceOf, which, target) {
  ev.preventDefault(); ev.stopPropagation();
  target.setPointerCapture(ev.pointerId);
  const move = (e) => {
    const k = sliceOf(e.clientY);
    if (which === "start") S.start = k; else S.end = k;
    if (S.mode === "slice") S.end = S.start;
    S.cursor = k;
    placeGuides();
  };
  const up = () => {
    target.removeEventListener("pointermove", move);
    target.removeEventListener("pointerup", up);
    drawAxial();
  };
  target.addEventListener("pointermove", move);
  target.addEventListener("pointerup", up);
}
function yPercent(k) { return ((k + 0.5) / nz()) * 100; }
function placeGuides() {
  for (const wrap of [$("coronal-wrap"), $("sagittal-wrap")]) {
    ensureGuides(wrap);
    wrap.querySelector(".guide.start").style.top = `${yPercent(S.start)}%`;
    const end = wrap.querySelector(".guide.end");
    end.style.top = `${yPercent(S.end)}%`;
    end.hidden = S.mode === "slice";
    wrap.querySelector(".guide.start span").textContent = S.mode === "slice" ? "slice" : "start";
    const lo = Math.min(S.start, S.end), hi = Math.max(S.start, S.end);
    const band = wrap.querySelector(".band");
    band.style.top = `${(lo / nz()) * 100}%`;
    band.style.height = `${((hi - lo + 1) / nz()) * 100}%`;
    wrap.querySelector(".cursor").style.top = `${yPercent(S.cursor)}%`;
  }
  const lo = Math.min(S.start, S.end), hi = Math.max(S.start, S.end);
  const n = hi - lo + 1;
  const pos = S.meta.positions_mm;
  $("selection").textContent = S.mode === "slice"
    ? `Slice ${lo} (z ${pos[lo].toFixed(1)} mm)`
    : `Slices ${lo}-${hi} (${n} files, z ${pos[lo].toFixed(1)} to ${pos[hi].toFixed(1)} mm)`;
  $("download").href = `/api/series/${S.key}/download?start=${lo}&end=${hi}`;
  if (S.nv) drawNvOverlay();
}
function setMode(mode) {
  S.mode = mode;
  $("mode-range").classList.toggle("active", mode === "range");
  $("mode-slice").classList.toggle("active", mode === "slice");
  if (mode === "slice") {
    const lo = Math.min(S.start, S.end), hi = Math.max(S.start, S.end);
    S.start = S.end = Math.round((lo + hi) / 2);
  } else if (S.start === S.end) {
    S.start = clamp(S.start - 2); S.end = clamp(S.end + 2);
  }
  S.cursor = S.start;
  placeGuides(); drawAxial();
}
function applySuggestion() {
  const s = S.meta.suggestion;
  if (s.start !== null) {
    S.start = s.start; S.end = s.end;
    if (S.mode === "slice") S.start = S.end = Math.round((s.start + s.end) / 2);
    $("suggestion").textContent = `Suggestion only (counted from the ${s.anchor}): ${s.note}`;
  } else {
    const mid = Math.floor(nz() / 2);
    S.start = clamp(mid - 2); S.end = S.mode === "slice" ? S.start : clamp(mid + 2);
    $("suggestion").textContent = `No L3 suggestion: ${s.note}`;
  }
  S.cursor = S.start;
  placeGuides(); drawAxial();
}

async function loadSeries(key) {
  S.key = key;
  status("loading series...");
  S.meta = await (await api(`/api/series/${key}/meta`)).json();
  S.vol = new Int16Array(await (await api(`/api/series/${key}/volume.i16`)).arrayBuffer());
  S.row = S.meta.spine_row; S.col = S.meta.spine_column;
  layoutSelection();
  drawReformats();
  applySuggestion();
  if (NIIVUE) await startNiivue();
  $("select-view").dataset.loaded = key;
  status(`${S.meta.description || "series"}: ${S.meta.shape[0]} slices, spacing ` +
    `${S.meta.spacing_mm.map((v) => v.toFixed(2)).join(" x ")} mm ${S.meta.note ? "- " + S.meta.note : ""}`);
}

// ------------------------------------------------------------------ NiiVue (the viewer where WebGL2 runs on a GPU)
async function startNiivue() {
  const { createNiivueView, NIIVUE_VERSION } = await import("./nvview.js");
  const panel = $("nv-panel");
  // a fresh canvas per series: a NiiVue instance owns its canvas's WebGL context
  const old = $("nv-canvas"), canvas = old.cloneNode(false);
  old.replaceWith(canvas);
  S.nv = await createNiivueView(canvas, S.meta, S.vol, S.wl, (loc) => {
    $("nv-hu").textContent = `${loc.hu} HU at slice ${loc.k}, row ${loc.row}, col ${loc.col}`;
    if (loc.programmatic || labelling()) return;
    S.row = loc.row; S.col = loc.col;
    drawReformats();
    setCursor(loc.k);
  });
  panel.hidden = false;
  if (!S.nv) { $("nv-version").textContent = "not shown: the series is not axis-aligned"; return; }
  $("nv-version").textContent = NIIVUE_VERSION;
  panel.dataset.niivue = NIIVUE_VERSION;
  panel.dataset.gl = S.nv.gl2 ? "webgl2" : "none";
  S.nv.setWindow(S.wl); // the window NiiVue loaded with (in the header): no refresh
  panel.dataset.window = nvWindowLabel();
  panel.dataset.windowRefreshes = "0";
  nvCursor(S.cursor);
  syncLabels();
}
// Point NiiVue's crosshair at (k, row, col) and note where it drew the axial tile (a check that
// the image is not mirrored compares that tile with the slice).
function nvCursor(k) {
  S.nv.setCursor(k, S.row, S.col);
  const tile = S.nv.axialTile();
  if (tile && tile.every(Number.isFinite)) $("nv-panel").dataset.axialTile = tile.map((x) => x.toFixed(1)).join(",");
  drawNvOverlay();
}
// The suggested vertebrae and the selected range over NiiVue's coronal and sagittal images,
// placed through NiiVue's own mapping (display only: clicks go through to NiiVue).
function drawNvOverlay() {
  const layer = $("nv-overlay");
  layer.replaceChildren();
  if (!S.nv || labelling()) return;
  const box = (cls, rect, span, text) => {
    const el = document.createElement("div");
    el.className = cls;
    el.style.left = `${rect[0]}px`; el.style.width = `${rect[2]}px`;
    el.style.top = `${rect[1] + span[0] * rect[3]}px`; el.style.height = `${(span[1] - span[0]) * rect[3]}px`;
    if (text) { const t = document.createElement("span"); t.textContent = text; el.appendChild(t); }
    return el;
  };
  for (const plane of [1, 2]) {
    const rect = S.nv.planeRect(plane);
    if (!rect || !rect.every(Number.isFinite)) continue;
    for (const v of S.meta.suggestion.vertebrae) {
      const el = box("vertebra", rect, S.nv.sliceSpan(v.start, v.end), v.name);
      el.dataset.plane = String(plane);
      layer.appendChild(el);
    }
    layer.appendChild(box("band", rect, S.nv.sliceSpan(S.start, S.end)));
    // the range's guides, dragged as on the canvas views (slice mode: one guide, "slice")
    for (const which of S.mode === "slice" ? ["start"] : ["start", "end"]) {
      const k = which === "start" ? S.start : S.end, span = S.nv.sliceSpan(k, k);
      const g = document.createElement("div");
      g.className = `guide ${which}`;
      g.dataset.which = which; g.dataset.plane = String(plane);
      g.style.left = `${rect[0]}px`; g.style.width = `${rect[2]}px`; g.style.right = "auto";
      g.style.top = `${rect[1] + ((span[0] + span[1]) / 2) * rect[3]}px`;
      const t = document.createElement("span");
      t.textContent = S.mode === "slice" ? "slice" : which;
      g.appendChild(t);
      g.addEventListener("pointerdown", (ev) => {
        if (ev.button !== 0 || ev.shiftKey) return;
        const sliceOf = (y) => {
          const now = S.nv.planeRect(plane);
          return S.nv.sliceAtFraction((y - layer.getBoundingClientRect().top - now[1]) / now[3]);
        };
        startDrag(ev, sliceOf, which, layer.parentElement); // the overlay is redrawn while dragging
      });
      layer.appendChild(g);
    }
  }
}
// Mirror the session's labels into NiiVue's drawing layer (all slices, or one position).
function syncLabels(pos) {
  if (!S.nv) return;
  if (!S.session) S.nv.clearLabels();
  else if (pos === undefined) S.session.slices.forEach((s, i) => S.nv.setLabels(s.index, S.labels[i]));
  else S.nv.setLabels(S.session.slices[pos].index, S.labels[pos]);
  $("nv-panel").dataset.drawCounts = S.nv.labelCounts().join(",");
}

function setupSelectionViews() {
  const axial = viewport("axial-wrap", {
    scroll: (d) => setCursor(S.cursor + d),
    probe: (ev) => {
      if (!S.vol) return;
      const [fx, fy] = stageFraction(axial, ev), [, ny, nx] = S.meta.shape;
      const x = Math.floor(fx * nx), y = Math.floor(fy * ny);
      if (x >= 0 && y >= 0 && x < nx && y < ny) showHU(huVol(S.cursor, y, x), `slice ${S.cursor}, row ${y}, col ${x}`);
    },
  });
  $("axial-canvas").addEventListener("click", (ev) => {
    if (ev.shiftKey) return;
    const [fx, fy] = stageFraction(axial, ev), [, ny, nx] = S.meta.shape;
    S.row = Math.max(0, Math.min(ny - 1, Math.floor(fy * ny)));
    S.col = Math.max(0, Math.min(nx - 1, Math.floor(fx * nx)));
    drawReformats();
  });
  const coronal = viewport("coronal-wrap", {
    scroll: (d) => { S.row = Math.max(0, Math.min(S.meta.shape[1] - 1, S.row + d)); drawReformats(); },
    probe: (ev) => {
      if (!S.vol) return;
      const [fx, fy] = stageFraction(coronal, ev), [z, , nx] = S.meta.shape;
      const x = Math.floor(fx * nx), k = Math.floor(fy * z);
      if (x >= 0 && k >= 0 && x < nx && k < z) showHU(huVol(k, S.row, x), `slice ${k}, row ${S.row}, col ${x}`);
    },
  });
  const sagittal = viewport("sagittal-wrap", {
    scroll: (d) => { S.col = Math.max(0, Math.min(S.meta.shape[2] - 1, S.col + d)); drawReformats(); },
    probe: (ev) => {
      if (!S.vol) return;
      const [fx, fy] = stageFraction(sagittal, ev), [z, ny] = S.meta.shape;
      const y = Math.floor(fx * ny), k = Math.floor(fy * z);
      if (y >= 0 && k >= 0 && y < ny && k < z) showHU(huVol(k, y, S.col), `slice ${k}, row ${y}, col ${S.col}`);
    },
  });
}
function showHU(value, where) { $("hu").textContent = `${value} HU at ${where}`; }

async function init() {
  S.info = await (await api("/api/info")).json();
  $("folder").textContent = S.info.folder;
  for (const c of S.info.cutoff_sets) $("cutoff").add(new Option(c, c));
  for (const cls of [1, 2, 3]) {
    const [lo, hi] = S.info.brush_hu[String(cls)];
    $(`hu-lo-${cls}`).value = lo; $(`hu-hi-${cls}`).value = hi;
  }
  S.wl = { ...S.info.presets.abdomen };
  showWindow();
  const listing = await (await api("/api/series")).json();
  const sel = $("series");
  for (const s of listing.series) {
    sel.add(new Option(`${s.description || "(no description)"} - ${s.count} slices`, s.key));
  }
  $("skipped-summary").textContent = `Skipped files (${listing.skipped.length})`;
  for (const s of listing.skipped) {
    const li = document.createElement("li"); li.textContent = `${s.file}: ${s.reason}`; $("skipped").appendChild(li);
  }
  if (!listing.series.length) { status("No CT series in this folder", true); return; }
  sel.addEventListener("change", guard(async () => {
    if (!confirmDiscard()) { sel.value = S.key; return; }
    S.session = null; S.dirty = false;
    $("label-view").hidden = true; $("select-view").hidden = false;
    await loadSeries(sel.value);
  }));
  await loadSeries(listing.series[0].key);
}

// ------------------------------------------------------------------ labelling view
const ctCanvas = () => $("ct-canvas");
const ovCanvas = () => $("ov-canvas");
function cur() { return S.session.slices[S.pos]; }
function currentClass() { return Number(document.querySelector("input[name=cls]:checked").value); }
function currentTool() { return document.querySelector("input[name=tool]:checked").value; }

function setDirty(dirty) {
  S.dirty = dirty;
  $("dirty").textContent = dirty ? "Unsaved edits" : "";
}
function confirmDiscard() {
  return !S.dirty || window.confirm("You have unsaved edits. Discard them?");
}

async function segmentSelected() {
  if (!confirmDiscard()) return;
  const lo = Math.min(S.start, S.end), hi = Math.max(S.start, S.end);
  status(`segmenting ${hi - lo + 1} slices...`);
  const res = await api(`/api/series/${S.key}/segment`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ start: lo, end: hi }),
  });
  const session = await res.json();
  const labels = [], hu = [];
  for (let i = 0; i < session.slices.length; i++) {
    labels.push(new Uint8Array(await (await api(`/api/session/${session.session}/labels/${i}`)).arrayBuffer()));
    hu.push(new Int16Array(await (await api(`/api/session/${session.session}/hu/${i}.i16`)).arrayBuffer()));
  }
  S.session = session; S.labels = labels; S.hu = hu;
  S.undo = []; S.redo = []; S.pos = 0; setDirty(false);
  if (S.nv) { nvLayout("axial"); S.nv.clearLabels(); syncLabels(); $("nv-overlay").replaceChildren(); }
  const m = $("method");
  m.textContent = S.session.method === "fallback" ? S.session.method_label : `Pre-segmented by ${S.session.method_label}`;
  m.className = `method ${S.session.method}`;
  $("height").value = S.session.height_m ? S.session.height_m.toFixed(2) : "";
  $("sex").value = S.session.sex || "";
  $("save-status").textContent = S.info.site ? `Saves into ${S.info.site}` : "Saving disabled: start with --site DIR";
  $("save").disabled = !S.info.site;
  $("select-view").hidden = true; $("label-view").hidden = false;
  setLetters($("canvas-wrap"), S.meta.orientation.axial);
  VIEWS["canvas-wrap"].reset();
  await showSlice(0);
  status(`${S.session.slices.length} slices pre-segmented`);
}

async function showSlice(pos) {
  S.pos = Math.max(0, Math.min(S.session.slices.length - 1, pos));
  const s = cur();
  for (const c of [ctCanvas(), ovCanvas()]) { c.width = s.cols; c.height = s.rows; }
  setAspect("canvas-wrap", 512, (s.rows * s.spacing_mm[0]) / (s.cols * s.spacing_mm[1]));
  $("slice-name").textContent = `${S.pos + 1}/${S.session.slices.length}: slice ${s.index}`;
  if (S.nv) nvCursor(s.index);
  drawCT();
  drawOverlay();
  sizeOutline();
  await refreshQuant();
}
function drawCT() {
  const s = cur(), hu = S.hu[S.pos];
  grey(ctCanvas().getContext("2d"), s.cols, s.rows, (i) => hu[i]);
}

function drawOverlay() {
  const s = cur(), lab = S.labels[S.pos];
  const ctx = ovCanvas().getContext("2d");
  const data = ctx.createImageData(s.cols, s.rows);
  const visible = new Set([...document.querySelectorAll(".visible:checked")].map((x) => Number(x.value)));
  for (let i = 0; i < lab.length; i++) {
    const v = lab[i];
    if (v && visible.has(v)) {
      const c = COLOURS[v];
      data.data[4 * i] = c[0]; data.data[4 * i + 1] = c[1]; data.data[4 * i + 2] = c[2]; data.data[4 * i + 3] = 255;
    }
  }
  ctx.putImageData(data, 0, 0);
  ovCanvas().style.opacity = Number($("opacity").value) / 100;
  nvOverlay(visible);
}
// NiiVue's drawing layer follows the overlay controls (opacity, visible classes).
function nvOverlay(visible) {
  if (!S.nv) return;
  const opacity = Number($("opacity").value) / 100;
  S.nv.setOverlay(opacity, visible);
  $("nv-panel").dataset.overlay = `${opacity.toFixed(2)}:${[...visible].sort().join("")}`;
}

function canvasPoint(ev) {
  const rect = ovCanvas().getBoundingClientRect(), s = cur();
  return [((ev.clientX - rect.left) / rect.width) * s.cols, ((ev.clientY - rect.top) / rect.height) * s.rows];
}
// The HU range the brush / eraser is limited to for a class, or null when the limit is off.
function huLimit(cls) {
  if (!$("hu-limit").checked) return null;
  const lo = Number($(`hu-lo-${cls}`).value), hi = Number($(`hu-hi-${cls}`).value);
  return [Math.min(lo, hi), Math.max(lo, hi)];
}
// Paint (or erase) a disc at native (x, y). The brush sets only unlabelled pixels and pixels of
// its own class unless "overwrite other classes" is on; the eraser clears only the current class
// unless it is on. With the HU limit on, both touch only pixels inside the class's HU range.
function paintAt(x, y) {
  const s = cur(), lab = S.labels[S.pos], hu = S.hu[S.pos], r = Number($("brush-size").value);
  const cls = currentClass(), erase = currentTool() === "eraser";
  const limit = huLimit(cls), overwrite = $("overwrite").checked;
  for (let row = Math.floor(y - r); row <= Math.ceil(y + r); row++) {
    if (row < 0 || row >= s.rows) continue;
    for (let col = Math.floor(x - r); col <= Math.ceil(x + r); col++) {
      if (col < 0 || col >= s.cols) continue;
      if ((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 > r * r) continue;
      const i = row * s.cols + col;
      if (limit && (hu[i] < limit[0] || hu[i] > limit[1])) continue;
      if (erase) { if (lab[i] === cls || (overwrite && lab[i])) lab[i] = 0; }
      else if (lab[i] === 0 || overwrite) lab[i] = cls;
    }
  }
}
function sizeOutline() {
  if (!S.session) return;
  const s = cur(), r = Number($("brush-size").value), o = $("brush-outline");
  o.style.width = `${((2 * r) / s.cols) * 100}%`;
  o.style.height = `${((2 * r) / s.rows) * 100}%`;
  o.className = `brush-outline c${currentClass()}${currentTool() === "eraser" ? " eraser" : ""}`;
}
// NiiVue's layout: the three planes while selecting, the session's axial slice alone (in a
// taller frame: NiiVue follows its size) while labelling.
function nvLayout(layout) {
  document.querySelector("#nv-panel .nv-box").classList.toggle("labelling", layout === "axial");
  S.nv.setLayout(layout);
}
// NiiVue's 2-D zoom (Ctrl+wheel or +/- with the pointer on it; 0 resets), shown in #nv-zoom.
function nvZoom(factor) {
  if (factor === null) S.nv.resetZoom(); else S.nv.zoomBy(factor);
  const z = S.nv.zoom();
  $("nv-zoom").textContent = z === 1 ? "" : `${z.toFixed(1)}x`;
  $("nv-panel").dataset.zoom = z.toFixed(3);
}
// The brush outline on NiiVue's axial tile while labelling: the brush's size in image pixels at
// the tile's scale, the class's colour, dashed for the eraser.
function moveNvOutline(ev) {
  const o = $("nv-brush-outline"), p = nvPoint(ev), tile = p && S.nv.axialTile();
  if (!tile) { o.hidden = true; return; }
  const box = o.parentElement.getBoundingClientRect(), s = cur(), r = Number($("brush-size").value);
  o.className = `brush-outline c${currentClass()}${currentTool() === "eraser" ? " eraser" : ""}`;
  o.style.width = `${(2 * r * tile[2]) / s.cols}px`;
  o.style.height = `${(2 * r * tile[3]) / s.rows}px`;
  o.style.left = `${ev.clientX - box.left}px`;
  o.style.top = `${ev.clientY - box.top}px`;
  o.hidden = false;
}
function moveOutline(ev) {
  const [x, y] = canvasPoint(ev), s = cur(), o = $("brush-outline");
  o.style.left = `${(x / s.cols) * 100}%`;
  o.style.top = `${(y / s.rows) * 100}%`;
  o.hidden = false;
  const col = Math.floor(x), row = Math.floor(y);
  if (col >= 0 && row >= 0 && col < s.cols && row < s.rows) {
    const v = S.labels[S.pos][row * s.cols + col];
    showHU(S.hu[S.pos][row * s.cols + col], `row ${row}, col ${col}${v ? ` (${CLASS_NAMES[v]})` : ""}`);
  }
}
// A brush on `target`: `pointOf(ev)` is the native (col, row) under the pointer, or null where
// the target does not paint now. One stroke = one undo step; the server gets it at the end.
function attachBrush(target, pointOf, { capture = false, onMove = null } = {}) {
  let last = null;
  target.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || ev.shiftKey || !S.session) return;
    const p = pointOf(ev);
    if (!p) return;
    ev.preventDefault(); // also keeps the compatibility mouse events from a viewer underneath
    if (capture) ev.stopPropagation();
    target.setPointerCapture(ev.pointerId);
    S.undo.push({ pos: S.pos, labels: S.labels[S.pos].slice() });
    if (S.undo.length > 100) S.undo.shift();
    S.redo = [];
    S.painting = target;
    last = p;
    paintAt(...last); drawOverlay();
    if (capture) syncLabels(S.pos);
  }, capture);
  target.addEventListener("pointermove", (ev) => {
    if (onMove) onMove(ev);
    if (S.painting !== target) return;
    if (capture) ev.stopPropagation();
    const p = pointOf(ev);
    if (!p) return;
    const steps = Math.max(1, Math.ceil(Math.hypot(p[0] - last[0], p[1] - last[1])));
    for (let t = 1; t <= steps; t++) paintAt(last[0] + ((p[0] - last[0]) * t) / steps, last[1] + ((p[1] - last[1]) * t) / steps);
    last = p; drawOverlay();
    if (capture) syncLabels(S.pos);
  }, capture);
  const end = (ev) => {
    if (S.painting !== target) return;
    if (capture) ev.stopPropagation();
    S.painting = false; setDirty(true);
    syncLabels(S.pos);
    guard(pushLabels)(S.pos);
  };
  target.addEventListener("pointerup", end, capture);
  target.addEventListener("pointercancel", end, capture);
}
// The native (col, row) under the pointer on NiiVue's axial view while labelling, or null
// (NiiVue shows the current session slice there; its zoom and pan are followed).
function nvPoint(ev) {
  if (!S.nv || !labelling()) return null;
  return S.nv.pointerToPixel(ev.clientX, ev.clientY);
}
function setupPainting() {
  const v = viewport("canvas-wrap", {
    scroll: (d) => { if (S.session) guard(showSlice)(S.pos + d); },
  });
  const c = ovCanvas();
  attachBrush(c, canvasPoint, { onMove: moveOutline });
  c.addEventListener("pointerleave", () => { $("brush-outline").hidden = true; });
  // while labelling, a left-drag on NiiVue's axial tile paints with the same rules (capture
  // phase on its frame: NiiVue never sees the stroke)
  const nvBox = document.querySelector("#nv-panel .nv-box");
  attachBrush(nvBox, nvPoint, { capture: true, onMove: moveNvOutline });
  nvBox.addEventListener("pointerleave", () => { $("nv-brush-outline").hidden = true; S.nvHovered = false; });
  nvBox.addEventListener("pointerenter", () => { S.nvHovered = true; });
  // the HU under the pointer on any NiiVue tile, as on the canvas views
  nvBox.addEventListener("pointermove", (ev) => {
    const at = S.nv && S.vol ? S.nv.voxelAt(ev.clientX, ev.clientY) : null;
    if (!at) return;
    const [, ny, nx] = S.meta.shape;
    showHU(S.vol[(at.k * ny + at.row) * nx + at.col], `slice ${at.k}, row ${at.row}, col ${at.col}`);
  });
  // A drag on NiiVue that NiiVue never sees (capture phase): `onMove(e)` until the button is up.
  const nvDrag = (ev, onMove) => {
    ev.preventDefault(); ev.stopPropagation();
    nvBox.setPointerCapture(ev.pointerId);
    const move = (e) => { e.stopPropagation(); onMove(e); };
    const up = () => { nvBox.removeEventListener("pointermove", move, true); nvBox.removeEventListener("pointerup", up, true); };
    nvBox.addEventListener("pointermove", move, true);
    nvBox.addEventListener("pointerup", up, true);
  };
  nvBox.addEventListener("pointerdown", (ev) => {
    if (!S.nv) return;
    if (ev.button === 1 || (ev.button === 0 && ev.shiftKey)) {
      // Shift+drag or middle-drag: pan its 2-D views (as on the canvas views)
      const pan = S.nv.panFrom(ev.clientX, ev.clientY);
      nvDrag(ev, (e) => pan(e.clientX, e.clientY));
    } else if (ev.button === 2) {
      // right-drag: the workbench's window/level (one model for every view)
      let lx = ev.clientX, ly = ev.clientY;
      nvDrag(ev, (e) => {
        const dx = e.clientX - lx, dy = e.clientY - ly; lx = e.clientX; ly = e.clientY;
        S.wl.width = Math.max(1, S.wl.width + dx * 4);
        S.wl.level += dy * 2;
        redrawAll();
      });
    }
  }, true);
  nvBox.addEventListener("contextmenu", (ev) => ev.preventDefault());
  // Ctrl+wheel zooms NiiVue's 2-D views (about its crosshair); while labelling, its wheel pages
  // through the session's slices, as the canvas view does
  nvBox.addEventListener("wheel", (ev) => {
    if (S.nv && (ev.ctrlKey || ev.metaKey) && ev.deltaY) {
      ev.preventDefault(); ev.stopPropagation();
      nvZoom(ev.deltaY < 0 ? 1.25 : 0.8);
      return;
    }
    if (!S.nv || !labelling() || ev.ctrlKey || !ev.deltaY) return;
    ev.preventDefault(); ev.stopPropagation();
    guard(showSlice)(S.pos + (ev.deltaY > 0 ? 1 : -1));
  }, { capture: true, passive: false });
  return v;
}
async function pushLabels(pos) {
  await api(`/api/session/${S.session.session}/labels/${pos}`, {
    method: "PUT", headers: { "Content-Type": "application/octet-stream" }, body: S.labels[pos],
  });
  await refreshQuant();
}
// Undo / redo: each step is a whole-slice snapshot taken before a stroke.
async function restore(from, to) {
  const step = from.pop();
  if (!step) return;
  to.push({ pos: step.pos, labels: S.labels[step.pos].slice() });
  S.labels[step.pos] = step.labels;
  setDirty(true);
  if (step.pos !== S.pos) await showSlice(step.pos); else drawOverlay();
  syncLabels(step.pos);
  await pushLabels(step.pos);
}
const undo = () => restore(S.undo, S.redo);
const redo = () => restore(S.redo, S.undo);

function quantParams() {
  const p = new URLSearchParams({ cutoff: $("cutoff").value, sex: $("sex").value });
  if ($("height").value) p.set("height_m", $("height").value);
  return p.toString();
}
async function refreshQuant() {
  const q = await (await api(`/api/session/${S.session.session}/quant?${quantParams()}`)).json();
  const body = $("quant-table").querySelector("tbody");
  body.innerHTML = "";
  const f = (v, d) => (v === null || v === undefined ? "-" : v.toFixed(d));
  q.rows.forEach((r, i) => {
    const tr = document.createElement("tr");
    if (i === S.pos) tr.className = "current";
    const call = r.sarcopenic === null ? "unknown" : r.sarcopenic ? "yes" : "no";
    for (const v of [r.index, f(r.areas_cm2.muscle, 1), f(r.areas_cm2.subcutaneous_fat, 1), f(r.areas_cm2.visceral_fat, 1),
      f(r.mean_hu.muscle, 0), f(r.mean_hu.subcutaneous_fat, 0), f(r.mean_hu.visceral_fat, 0), f(r.smi, 1), call]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    }
    body.appendChild(tr);
  });
  $("csv").href = `/api/session/${S.session.session}/quant.csv?${quantParams()}`;
}
async function saveToSite() {
  const height = $("height").value ? Number($("height").value) : null;
  const res = await api(`/api/session/${S.session.session}/save`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ height_m: height, sex: $("sex").value || null }),
  });
  const out = await res.json();
  setDirty(false);
  $("save-status").textContent = `Saved ${out.written.length} slice(s) to ${out.site}`;
  status("saved");
}

// ------------------------------------------------------------------ keyboard
function onKey(ev) {
  const t = ev.target;
  if (t && (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "checkbox" && t.type !== "range" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
  const ctrl = ev.ctrlKey || ev.metaKey, k = ev.key;
  if (ctrl && (k === "z" || k === "Z")) {
    if (!labelling()) return;
    ev.preventDefault(); guard(ev.shiftKey ? redo : undo)(); return;
  }
  if (ctrl && (k === "y" || k === "Y")) { if (labelling()) { ev.preventDefault(); guard(redo)(); } return; }
  if (ctrl || ev.altKey) return;
  const step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: PAGE, PageUp: -PAGE }[k];
  const view = hoveredViewport() || (labelling() ? VIEWS["canvas-wrap"] : VIEWS["axial-wrap"]);
  if (step !== undefined) {
    ev.preventDefault();
    if (labelling()) guard(showSlice)(S.pos + step);
    else if (S.meta) setCursor(S.cursor + step);
    return;
  }
  const zoom = S.nv && S.nvHovered ? (f) => nvZoom(f) : (f) => (f === null ? view.reset() : view.zoomBy(f));
  if (k === "+" || k === "=") { zoom(1.25); ev.preventDefault(); return; }
  if (k === "-") { zoom(0.8); ev.preventDefault(); return; }
  if (k === "0") { zoom(null); return; }
  if (!labelling()) return;
  const pick = (sel) => { const el = document.querySelector(sel); el.checked = true; sizeOutline(); };
  if (k === "b" || k === "B") pick("input[name=tool][value=brush]");
  else if (k === "e" || k === "E") pick("input[name=tool][value=eraser]");
  else if (k === "1" || k === "2" || k === "3") pick(`input[name=cls][value='${k}']`);
  else if (k === "[" || k === "]") {
    const b = $("brush-size");
    b.value = Math.max(Number(b.min), Math.min(Number(b.max), Number(b.value) + (k === "]" ? 1 : -1)));
    sizeOutline();
  }
}

// ------------------------------------------------------------------ wiring
function guard(fn) {
  return (...args) => Promise.resolve().then(() => fn(...args)).catch((e) => { status(e.message, true); $("save-status").textContent = ""; });
}
window.addEventListener("beforeunload", (ev) => {
  if (!S.dirty) return;
  ev.preventDefault();
  ev.returnValue = "";
});
window.addEventListener("DOMContentLoaded", () => {
  // NiiVue is the viewer: its panel on top of both views, the canvas views hidden (style.css)
  if (NIIVUE) document.querySelector("main").prepend($("nv-panel"));
  setupSelectionViews();
  setupPainting();
  $("mode-range").addEventListener("click", () => setMode("range"));
  $("mode-slice").addEventListener("click", () => setMode("slice"));
  $("suggest").addEventListener("click", applySuggestion);
  $("segment").addEventListener("click", guard(segmentSelected));
  $("back").addEventListener("click", () => {
    $("label-view").hidden = true; $("select-view").hidden = false;
    if (S.nv) { nvLayout("multiplanar"); nvCursor(S.cursor); }
    redrawAll();
  });
  for (const b of document.querySelectorAll(".preset")) {
    b.addEventListener("click", () => { S.wl = { ...S.info.presets[b.dataset.preset] }; redrawAll(); });
  }
  $("prev").addEventListener("click", guard(() => showSlice(S.pos - 1)));
  $("next").addEventListener("click", guard(() => showSlice(S.pos + 1)));
  $("undo").addEventListener("click", guard(undo));
  $("redo").addEventListener("click", guard(redo));
  $("opacity").addEventListener("input", drawOverlay);
  $("brush-size").addEventListener("input", sizeOutline);
  document.querySelectorAll("input[name=tool], input[name=cls]").forEach((x) => x.addEventListener("change", sizeOutline));
  document.querySelectorAll(".visible").forEach((x) => x.addEventListener("change", drawOverlay));
  for (const id of ["height", "sex", "cutoff"]) $(id).addEventListener("change", guard(refreshQuant));
  $("save").addEventListener("click", guard(saveToSite));
  document.addEventListener("keydown", onKey);
  guard(init)();
});
