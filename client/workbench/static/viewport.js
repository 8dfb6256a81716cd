// A 2-D image viewport for the workbench: draws HU through a window, zooms, pans and reports
// window/level drags. No state of the workbench lives here: app.js passes callbacks.
//
// A viewport is a fixed-size .viewport element holding a .stage (the image at its true
// aspect, with any overlays) that is scaled and translated with a CSS transform. Mouse:
// wheel -> opts.scroll(+1 | -1), Ctrl+wheel zoom about the pointer, right-drag ->
// opts.windowDrag(dx, dy), middle-drag or Shift+drag pan, double-click reset.

let hovered = null;

/** The viewport under the mouse pointer, or null. */
export function hoveredViewport() { return hovered; }

/** Draw HU values (huAt(i), i = row * width + col) through a window {width, level} as grey. */
export function greyImage(ctx, width, height, huAt, wl) {
  const img = ctx.createImageData(width, height);
  const lo = wl.level - wl.width / 2, scale = 255 / Math.max(1, wl.width);
  for (let i = 0, n = width * height; i < n; i++) {
    const g = Math.max(0, Math.min(255, (huAt(i) - lo) * scale));
    img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = g; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

/** Fraction (0..1, 0..1) of the stage under a pointer event, zoom and pan included. */
export function stageFraction(v, ev) {
  const r = v.stage.getBoundingClientRect();
  return [(ev.clientX - r.left) / r.width, (ev.clientY - r.top) / r.height];
}

/** Write the orientation letters {top, bottom, left, right} into a viewport's .orient spans. */
export function setLetters(wrap, letters) {
  for (const side of ["top", "bottom", "left", "right"]) {
    wrap.querySelector(`.orient.${side}`).textContent = letters ? letters[side] : "";
  }
}

/** Make `wrap` (a .viewport with a .stage inside) zoomable and pannable. */
export function makeViewport(wrap, opts) {
  const stage = wrap.querySelector(".stage");
  const v = { wrap, stage, zoom: 1, px: 0, py: 0 };
  const apply = () => {
    stage.style.transform = `translate(${v.px}px, ${v.py}px) scale(${v.zoom})`;
    const z = wrap.querySelector(".zoom");
    if (z) z.textContent = v.zoom === 1 ? "" : `${v.zoom.toFixed(1)}x`;
  };
  v.reset = () => { v.zoom = 1; v.px = 0; v.py = 0; apply(); };
  v.setHeight = (px) => { wrap.style.height = `${px}px`; stage.style.height = `${px}px`; };
  v.zoomBy = (factor, cx, cy) => {
    const rect = wrap.getBoundingClientRect();
    const x = cx === undefined ? rect.width / 2 : cx - rect.left, y = cy === undefined ? rect.height / 2 : cy - rect.top;
    const z = Math.max(1, Math.min(8, v.zoom * factor));
    v.px = x - ((x - v.px) * z) / v.zoom; v.py = y - ((y - v.py) * z) / v.zoom; v.zoom = z;
    if (z === 1) { v.px = 0; v.py = 0; }
    apply();
  };
  wrap.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    if (ev.ctrlKey || ev.metaKey) v.zoomBy(ev.deltaY < 0 ? 1.25 : 0.8, ev.clientX, ev.clientY);
    else if (opts.scroll && ev.deltaY) opts.scroll(ev.deltaY > 0 ? 1 : -1);
  }, { passive: false });
  wrap.addEventListener("contextmenu", (ev) => ev.preventDefault());
  wrap.addEventListener("dblclick", () => v.reset());
  wrap.addEventListener("mouseenter", () => { hovered = v; });
  wrap.addEventListener("mouseleave", () => { if (hovered === v) hovered = null; });
  // Capture phase: a pan or window drag never reaches the brush or the guide lines.
  wrap.addEventListener("pointerdown", (ev) => {
    const pan = ev.button === 1 || (ev.button === 0 && ev.shiftKey), wl = ev.button === 2;
    if (!pan && !wl) return;
    ev.preventDefault(); ev.stopPropagation();
    wrap.setPointerCapture(ev.pointerId);
    let lx = ev.clientX, ly = ev.clientY;
    const move = (e) => {
      const dx = e.clientX - lx, dy = e.clientY - ly; lx = e.clientX; ly = e.clientY;
      if (pan) { v.px += dx; v.py += dy; apply(); } else if (opts.windowDrag) opts.windowDrag(dx, dy);
    };
    const up = () => { wrap.removeEventListener("pointermove", move); wrap.removeEventListener("pointerup", up); };
    wrap.addEventListener("pointermove", move);
    wrap.addEventListener("pointerup", up);
  }, true);
  wrap.addEventListener("pointermove", (ev) => { if (opts.probe) opts.probe(ev); });
  wrap.addEventListener("pointerleave", () => { if (opts.leave) opts.leave(); });
  apply();
  return v;
}
