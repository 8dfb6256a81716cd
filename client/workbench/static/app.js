// sarcofed site workbench: L3 selection (axial + coronal + sagittal with guide lines) and labelling.
// Plain JS, no external resources. Everything talks to the local server under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = { 1: [230, 60, 60], 2: [245, 200, 40], 3: [40, 190, 170] };

const S = {
  info: null, key: null, meta: null, preset: "abdomen", mode: "range",
  start: 0, end: 0, cursor: 0, row: 0, col: 0,
  session: null, pos: 0, labels: [], undo: [], painting: false,
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

// ------------------------------------------------------------------ selection view
function nz() { return S.meta ? S.meta.shape[0] : 1; }
function clamp(k) { return Math.max(0, Math.min(nz() - 1, k)); }

function viewUrl(plane, index) {
  return `/api/series/${S.key}/${plane}.png?index=${index}&preset=${S.preset}`;
}
function refreshAxial() {
  $("axial-img").src = viewUrl("axial", S.cursor);
  $("axial-index").textContent = `slice ${S.cursor} / ${nz() - 1}`;
}
function refreshReformats() {
  $("coronal-img").src = viewUrl("coronal", S.row);
  $("sagittal-img").src = viewUrl("sagittal", S.col);
  placeCross();
}
function placeCross() {
  if (!S.meta) return;
  const [, ny, nx] = S.meta.shape;
  $("cross-h").style.top = `${((S.row + 0.5) / ny) * 100}%`;
  $("cross-v").style.left = `${((S.col + 0.5) / nx) * 100}%`;
}

function ensureGuides(wrap) {
  if (wrap.querySelector(".guide")) return;
  for (const which of ["start", "end"]) {
    const g = document.createElement("div");
    g.className = `guide ${which}`;
    g.dataset.which = which;
    g.innerHTML = `<span>${which}</span>`;
    wrap.appendChild(g);
    g.addEventListener("pointerdown", (ev) => startDrag(ev, wrap, which));
  }
  const band = document.createElement("div"); band.className = "band"; wrap.appendChild(band);
  const cur = document.createElement("div"); cur.className = "cursor"; wrap.appendChild(cur);
  wrap.querySelector("img").addEventListener("click", (ev) => {
    S.cursor = sliceAt(wrap, ev.clientY); placeGuides(); refreshAxial();
  });
}
function sliceAt(wrap, clientY) {
  const rect = wrap.getBoundingClientRect();
  return clamp(Math.floor(((clientY - rect.top) / rect.height) * nz()));
}
function startDrag(ev, wrap, which) {
  ev.preventDefault();
  const target = ev.currentTarget;
  target.setPointerCapture(ev.pointerId);
  const move = (e) => {
    const k = sliceAt(wrap, e.clientY);
    if (which === "start") S.start = k; else S.end = k;
    if (S.mode === "slice") S.end = S.start;
    S.cursor = k;
    placeGuides();
  };
  const up = () => {
    target.removeEventListener("pointermove", move);
    target.removeEventListener("pointerup", up);
    refreshAxial();
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
  placeGuides(); refreshAxial();
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
  placeGuides(); refreshAxial();
}

async function loadSeries(key) {
  S.key = key;
  status("loading series...");
  S.meta = await (await api(`/api/series/${key}/meta`)).json();
  S.row = S.meta.spine_row; S.col = S.meta.spine_column;
  refreshReformats();
  applySuggestion();
  status(`${S.meta.description || "series"}: ${S.meta.shape[0]} slices, spacing ` +
    `${S.meta.spacing_mm.map((v) => v.toFixed(2)).join(" x ")} mm ${S.meta.note ? "- " + S.meta.note : ""}`);
}

async function init() {
  S.info = await (await api("/api/info")).json();
  $("folder").textContent = S.info.folder;
  for (const c of S.info.cutoff_sets) $("cutoff").add(new Option(c, c));
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
  sel.addEventListener("change", () => loadSeries(sel.value).catch((e) => status(e.message, true)));
  await loadSeries(listing.series[0].key);
}

// ------------------------------------------------------------------ labelling view
const ctCanvas = () => $("ct-canvas");
const ovCanvas = () => $("ov-canvas");
function cur() { return S.session.slices[S.pos]; }
function currentClass() { return Number(document.querySelector("input[name=cls]:checked").value); }
function currentTool() { return document.querySelector("input[name=tool]:checked").value; }

async function segmentSelected() {
  const lo = Math.min(S.start, S.end), hi = Math.max(S.start, S.end);
  status(`segmenting ${hi - lo + 1} slices...`);
  const res = await api(`/api/series/${S.key}/segment`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ start: lo, end: hi }),
  });
  S.session = await res.json();
  S.labels = [];
  for (let i = 0; i < S.session.slices.length; i++) {
    const buf = await (await api(`/api/session/${S.session.session}/labels/${i}`)).arrayBuffer();
    S.labels.push(new Uint8Array(buf));
  }
  S.undo = []; S.pos = 0;
  const m = $("method");
  m.textContent = S.session.method === "fallback" ? S.session.method_label : `Pre-segmented by ${S.session.method_label}`;
  m.className = `method ${S.session.method}`;
  $("height").value = S.session.height_m ? S.session.height_m.toFixed(2) : "";
  $("sex").value = S.session.sex || "";
  $("save-status").textContent = S.info.site ? `Saves into ${S.info.site}` : "Saving disabled: start with --site DIR";
  $("save").disabled = !S.info.site;
  $("select-view").hidden = true; $("label-view").hidden = false;
  await showSlice(0);
  status(`${S.session.slices.length} slices pre-segmented`);
}

async function showSlice(pos) {
  S.pos = pos;
  const s = cur();
  for (const c of [ctCanvas(), ovCanvas()]) { c.width = s.cols; c.height = s.rows; }
  const aspect = (s.rows * s.spacing_mm[0]) / (s.cols * s.spacing_mm[1]);
  $("canvas-wrap").style.height = `${512 * aspect}px`;
  $("slice-name").textContent = `${pos + 1}/${S.session.slices.length}: slice ${s.index}`;
  const img = new Image();
  img.onload = () => ctCanvas().getContext("2d").drawImage(img, 0, 0);
  img.src = `/api/session/${S.session.session}/image/${pos}.png?preset=${S.preset}`;
  drawOverlay();
  await refreshQuant();
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
}

function canvasPoint(ev) {
  const rect = ovCanvas().getBoundingClientRect(), s = cur();
  return [((ev.clientX - rect.left) / rect.width) * s.cols, ((ev.clientY - rect.top) / rect.height) * s.rows];
}
function paintAt(x, y) {
  const s = cur(), lab = S.labels[S.pos], r = Number($("brush-size").value);
  const cls = currentClass(), erase = currentTool() === "eraser";
  for (let row = Math.floor(y - r); row <= Math.ceil(y + r); row++) {
    if (row < 0 || row >= s.rows) continue;
    for (let col = Math.floor(x - r); col <= Math.ceil(x + r); col++) {
      if (col < 0 || col >= s.cols) continue;
      if ((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 > r * r) continue;
      const i = row * s.cols + col;
      if (erase) { if (lab[i] === cls) lab[i] = 0; } else lab[i] = cls;
    }
  }
}
function setupPainting() {
  const c = ovCanvas();
  let last = null;
  c.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    c.setPointerCapture(ev.pointerId);
    S.undo.push({ pos: S.pos, labels: S.labels[S.pos].slice() });
    if (S.undo.length > 40) S.undo.shift();
    S.painting = true;
    last = canvasPoint(ev);
    paintAt(...last); drawOverlay();
  });
  c.addEventListener("pointermove", (ev) => {
    if (!S.painting) return;
    const p = canvasPoint(ev);
    const steps = Math.max(1, Math.ceil(Math.hypot(p[0] - last[0], p[1] - last[1])));
    for (let t = 1; t <= steps; t++) paintAt(last[0] + ((p[0] - last[0]) * t) / steps, last[1] + ((p[1] - last[1]) * t) / steps);
    last = p; drawOverlay();
  });
  const end = () => { if (S.painting) { S.painting = false; pushLabels(S.pos); } };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
}
async function pushLabels(pos) {
  await api(`/api/session/${S.session.session}/labels/${pos}`, {
    method: "PUT", headers: { "Content-Type": "application/octet-stream" }, body: S.labels[pos],
  });
  await refreshQuant();
}
async function undo() {
  const step = S.undo.pop();
  if (!step) return;
  S.labels[step.pos] = step.labels;
  if (step.pos !== S.pos) await showSlice(step.pos); else drawOverlay();
  await pushLabels(step.pos);
}

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
  $("save-status").textContent = `Saved ${out.written.length} slice(s) to ${out.site}`;
  status("saved");
}

// ------------------------------------------------------------------ wiring
function guard(fn) {
  return (...args) => Promise.resolve(fn(...args)).catch((e) => { status(e.message, true); $("save-status").textContent = ""; });
}
window.addEventListener("DOMContentLoaded", () => {
  $("mode-range").addEventListener("click", () => setMode("range"));
  $("mode-slice").addEventListener("click", () => setMode("slice"));
  $("suggest").addEventListener("click", applySuggestion);
  $("segment").addEventListener("click", guard(segmentSelected));
  $("back").addEventListener("click", () => { $("label-view").hidden = true; $("select-view").hidden = false; });
  $("axial-img").addEventListener("click", (ev) => {
    const rect = ev.currentTarget.getBoundingClientRect(), [, ny, nx] = S.meta.shape;
    S.row = Math.max(0, Math.min(ny - 1, Math.floor(((ev.clientY - rect.top) / rect.height) * ny)));
    S.col = Math.max(0, Math.min(nx - 1, Math.floor(((ev.clientX - rect.left) / rect.width) * nx)));
    refreshReformats();
  });
  for (const b of document.querySelectorAll(".preset")) {
    b.addEventListener("click", () => {
      S.preset = b.dataset.preset;
      document.querySelectorAll(".preset").forEach((x) => x.classList.toggle("active", x === b));
      if (!$("label-view").hidden && S.session) showSlice(S.pos); else if (S.meta) { refreshReformats(); refreshAxial(); }
    });
  }
  $("prev").addEventListener("click", guard(() => S.pos > 0 && showSlice(S.pos - 1)));
  $("next").addEventListener("click", guard(() => S.pos < S.session.slices.length - 1 && showSlice(S.pos + 1)));
  $("undo").addEventListener("click", guard(undo));
  $("opacity").addEventListener("input", drawOverlay);
  document.querySelectorAll(".visible").forEach((x) => x.addEventListener("change", drawOverlay));
  for (const id of ["height", "sex", "cutoff"]) $(id).addEventListener("change", guard(refreshQuant));
  $("save").addEventListener("click", guard(saveToSite));
  setupPainting();
  guard(init)();
});
