// NiiVue (WebGL2) multiplanar view of the loaded series with the session's mask as its drawing
// layer: the workbench's viewer where WebGL2 runs on a GPU, or with `?viewer=niivue`
// (viewer_choice.js, docs/WORKBENCH.md); elsewhere the canvas views (viewport.js) are.
//
// The volume goes to NiiVue as a NIfTI-1 built here from the int16 HU the server already sends,
// stored in RAS voxel order with a diagonal affine so that NiiVue never reorients it: voxel
// (i, j, kz) of NiiVue, and index i + j*nx + kz*nx*ny of its drawing bitmap, map to the workbench's
// (slice, row, col) by the flips in `toRas`. Only axis-aligned series are shown (the letters of
// the axial view must be A/P and R/L); anything else keeps to the canvas viewer.
import { DRAG_MODE, Niivue, SLICE_TYPE } from "./vendor/niivue/niivue.js";

export const NIIVUE_VERSION = "0.69.0";

// Labels 0-3: none, muscle, SAT, VAT (the canvas viewer's colours).
const DRAW_COLORMAP = {
  R: [0, 230, 245, 40], G: [0, 60, 200, 190], B: [0, 60, 40, 170], A: [0, 255, 255, 255],
  I: [0, 1, 2, 3], labels: ["", "Muscle", "SAT", "VAT"],
};

/** Flips from the workbench's (slice k, row, col) to RAS voxel order, from the view letters. */
export function rasFlips(orientation) {
  const ax = orientation.axial, cor = orientation.coronal;
  if (!ax || !cor) return null;
  const flipCol = ax.left === "R" ? true : ax.left === "L" ? false : null; // col towards L: RAS x falls
  const flipRow = ax.top === "A" ? true : ax.top === "P" ? false : null; // row towards P: RAS y falls
  const flipZ = cor.top === "S" ? true : cor.top === "I" ? false : null; // slice 0 superior: RAS z falls
  if (flipCol === null || flipRow === null || flipZ === null) return null;
  return { flipCol, flipRow, flipZ };
}

/** A NIfTI-1 (int16, RAS voxel order, diagonal sform in mm) of a (nz, ny, nx) HU volume. */
export function niftiFromHU(hu, shape, spacing, flips, wl) {
  const [nz, ny, nx] = shape, [dz, dy, dx] = spacing;
  const buf = new ArrayBuffer(352 + nx * ny * nz * 2);
  const v = new DataView(buf);
  v.setInt32(0, 348, true);
  const dim = [3, nx, ny, nz, 1, 1, 1, 1];
  dim.forEach((d, i) => v.setInt16(40 + 2 * i, d, true));
  v.setInt16(70, 4, true); // datatype: int16
  v.setInt16(72, 16, true); // bitpix
  [1, dx, dy, dz, 1, 1, 1, 1].forEach((p, i) => v.setFloat32(76 + 4 * i, p, true));
  v.setFloat32(108, 352, true); // vox_offset
  v.setFloat32(112, 1, true); // scl_slope
  v.setUint8(123, 10); // xyzt_units: mm, s
  if (wl) { // the initial window as cal_max / cal_min: no second pass over the volume to set it
    v.setFloat32(124, wl.level + wl.width / 2, true);
    v.setFloat32(128, wl.level - wl.width / 2, true);
  }
  v.setInt16(252, 0, true); // qform_code
  v.setInt16(254, 1, true); // sform_code: scanner
  [[dx, 0, 0, 0], [0, dy, 0, 0], [0, 0, dz, 0]].forEach((row, r) =>
    row.forEach((x, c) => v.setFloat32(280 + 16 * r + 4 * c, x, true)));
  "n+1\0".split("").forEach((ch, i) => v.setUint8(344 + i, ch.charCodeAt(0)));
  const out = new Int16Array(buf, 352);
  for (let k = 0; k < nz; k++) {
    const kz = flips.flipZ ? nz - 1 - k : k;
    for (let row = 0; row < ny; row++) {
      const j = flips.flipRow ? ny - 1 - row : row;
      const src = (k * ny + row) * nx, dst = (kz * ny + j) * nx;
      for (let col = 0; col < nx; col++) out[dst + (flips.flipCol ? nx - 1 - col : col)] = hu[src + col];
    }
  }
  return buf;
}

/** The RAS voxel (i, j, kz) of the workbench's (k, row, col). */
export function toRas(shape, flips, k, row, col) {
  const [nz, ny, nx] = shape;
  return [flips.flipCol ? nx - 1 - col : col, flips.flipRow ? ny - 1 - row : row, flips.flipZ ? nz - 1 - k : k];
}

/** The workbench's {k, row, col} of the RAS voxel (i, j, kz): the same flips, undone. */
export function fromRas(shape, flips, i, j, kz) {
  const [col, row, k] = toRas(shape, flips, kz, j, i); // each flip is its own inverse
  return { k, row, col };
}

/**
 * Start NiiVue on `canvas`. Returns null for a series that is not axis-aligned.
 * `onLocation({k, row, col, hu, programmatic})` is called when NiiVue's crosshair moves: a click in
 * it, or `setCursor` (programmatic: true).
 */
export async function createNiivueView(canvas, meta, hu, wl, onLocation) {
  const flips = rasFlips(meta.orientation);
  if (!flips) return null;
  const nv = new Niivue({
    backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false, isOrientCube: false,
    multiplanarShowRender: 0, isRadiologicalConvention: true, dragAndDropEnabled: false,
    drawingEnabled: false, logLevel: "warn", isNearestInterpolation: true,
    dragMode: DRAG_MODE.none, // right-drag is the workbench's window/level (app.js)
  });
  await nv.attachToCanvas(canvas);
  // Each full-volume pass (loading, a window change: NiiVue's refreshLayers) costs seconds for a
  // 512 x 512 x 72 series on a software GL (SwiftShader): the colormap is set before the volume
  // and the initial window rides in the header, so loading makes one pass.
  nv.setDrawColormap(DRAW_COLORMAP);
  nv.opts.sliceType = SLICE_TYPE.MULTIPLANAR;
  await nv.loadFromArrayBuffer(niftiFromHU(hu, meta.shape, meta.spacing_mm, flips, wl), "series.nii");
  nv.createEmptyDrawing();
  nv.setDrawOpacity(0.5);
  const [nz, ny, nx] = meta.shape;
  /** A client point (CSS pixels) in NiiVue's canvas pixels. */
  const toCanvas = (clientX, clientY) => {
    const rect = canvas.getBoundingClientRect(), scale = canvas.width / rect.width;
    return [(clientX - rect.left) * scale, (clientY - rect.top) * scale];
  };
  const view = {
    nv, flips, programmatic: false,
    gl2: nv.gl instanceof WebGL2RenderingContext,
    /** Show the window {width, level} in HU; true when NiiVue had to redraw its volume. */
    setWindow(wl) {
      const vol = nv.volumes[0], lo = wl.level - wl.width / 2, hi = wl.level + wl.width / 2;
      if (vol.cal_min === lo && vol.cal_max === hi) return false; // a full-volume pass: only on a change
      vol.cal_min = lo; vol.cal_max = hi;
      nv.refreshLayers(vol, 0);
      nv.drawScene();
      return true;
    },
    /** Put the crosshair on the workbench's (k, row, col). */
    setCursor(k, row, col) {
      const [i, j, kz] = toRas(meta.shape, flips, k, row, col);
      nv.scene.crosshairPos = nv.vox2frac([i, j, kz]);
      nv.drawScene();
      view.programmatic = true; // report the HU there, but do not move the workbench back
      try { nv.createOnLocationChange(); } finally { view.programmatic = false; }
    },
    /** Copy one axial slice of labels (rows x cols, uint8 0-3) into the drawing layer. */
    setLabels(k, labels) {
      const bmp = nv.drawBitmap;
      for (let row = 0; row < ny; row++) {
        for (let col = 0; col < nx; col++) {
          const [i, j, kz] = toRas(meta.shape, flips, k, row, col);
          bmp[i + j * nx + kz * nx * ny] = labels[row * nx + col];
        }
      }
      nv.refreshDrawing(true);
    },
    /**
     * Where NiiVue draws the axial slice on the canvas: [left, top, width, height] in CSS pixels
     * of the image's outer edges (not the tile, which may be letterboxed), or null.
     */
    axialTile() {
      const z = nv.scene.crosshairPos[2];
      const a = nv.frac2canvasPos([0, 0, z]), b = nv.frac2canvasPos([1, 1, z]);
      if (!a || !b || a[0] < 0 || b[0] < 0) return null;
      const scale = canvas.clientWidth / canvas.width;
      const left = Math.min(a[0], b[0]), top = Math.min(a[1], b[1]);
      return [left, top, Math.abs(b[0] - a[0]), Math.abs(b[1] - a[1])].map((x) => x * scale);
    },
    /**
     * Where NiiVue draws the coronal (1) or sagittal (2) image: [left, top, width, height] in CSS
     * pixels, or null when that plane is not shown. Corners through NiiVue's own mapping, on the
     * plane through its crosshair.
     */
    planeRect(plane) {
      const c = nv.scene.crosshairPos;
      const lo = plane === 1 ? [0, c[1], 0] : [c[0], 0, 0], hi = plane === 1 ? [1, c[1], 1] : [c[0], 1, 1];
      const a = nv.frac2canvasPosWithTile(lo, plane), b = nv.frac2canvasPosWithTile(hi, plane);
      if (!a || !b || a.tileIndex < 0 || b.tileIndex < 0) return null;
      const scale = canvas.clientWidth / canvas.width;
      const left = Math.min(a.pos[0], b.pos[0]), top = Math.min(a.pos[1], b.pos[1]);
      return [left, top, Math.abs(b.pos[0] - a.pos[0]), Math.abs(b.pos[1] - a.pos[1])].map((x) => x * scale);
    },
    /** The slice at fraction `frac` (0 top .. 1 bottom) of a coronal/sagittal image's height. */
    sliceAtFraction(frac) {
      const k = Math.floor((flips.flipZ ? frac : 1 - frac) * nz);
      return Math.min(nz - 1, Math.max(0, k));
    },
    /** Fractions (0 top .. 1 bottom) of a coronal/sagittal image's height spanned by slices k0..k1. */
    sliceSpan(k0, k1) {
      const lo = Math.min(k0, k1), hi = Math.max(k0, k1);
      // slice k covers z fractions [kz/nz, (kz+1)/nz]; the screen's top is z fraction 1
      const edge = (k) => (flips.flipZ ? k / nz : 1 - (k + 1) / nz);
      return flips.flipZ ? [edge(lo), edge(hi + 1)] : [edge(hi), edge(lo - 1)];
    },
    /**
     * The workbench's native (col, row), as continuous pixel coordinates (centres at +0.5), under
     * a client point on the canvas, or null off the image. Through NiiVue's own mapping, so its
     * tile layout, 2-D zoom and pan are followed.
     */
    pointerToPixel(clientX, clientY) {
      const frac = nv.canvasPos2frac(toCanvas(clientX, clientY));
      if (!(frac[0] >= 0 && frac[1] >= 0 && frac[0] <= 1 && frac[1] <= 1)) return null;
      const fi = frac[0] * nx, fj = frac[1] * ny; // voxel-centre coordinates, as +0.5 pixels
      return [flips.flipCol ? nx - fi : fi, flips.flipRow ? ny - fj : fj];
    },
    /**
     * The workbench's (k, row, col) of the voxel under a client point on any of NiiVue's 2-D
     * tiles (its zoom and pan followed), or null off the images.
     */
    voxelAt(clientX, clientY) {
      const frac = nv.canvasPos2frac(toCanvas(clientX, clientY));
      if (!frac.every((f) => f >= 0 && f <= 1)) return null;
      const voxel = (f, n) => Math.min(n - 1, Math.floor(f * n));
      return fromRas(meta.shape, flips, voxel(frac[0], nx), voxel(frac[1], ny), voxel(frac[2], nz));
    },
    /** NiiVue's 2-D zoom (1 = whole image). */
    zoom() { return nv.scene.pan2Dxyzmm[3]; },
    /** Zoom the 2-D views by `factor`, 1x to 8x, about the crosshair (NiiVue's own rule: the
     * voxel under the crosshair stays where it is on the screen). */
    zoomBy(factor) {
      const pan = nv.scene.pan2Dxyzmm, zoom = Math.min(8, Math.max(1, pan[3] * factor));
      const change = pan[3] - zoom, mm = nv.frac2mm(nv.scene.crosshairPos);
      nv.setPan2Dxyzmm(zoom === 1 ? [0, 0, 0, 1] : [0, 1, 2].map((a) => pan[a] + change * mm[a]).concat(zoom));
    },
    resetZoom() { nv.setPan2Dxyzmm([0, 0, 0, 1]); },
    /**
     * Start panning at a client point: returns `(clientX, clientY) => void` that moves the 2-D
     * views so that the point under the pointer at the start follows it (NiiVue's own pan rule).
     */
    panFrom(clientX, clientY) {
      const at = nv.scene.pan2Dxyzmm.slice(), [x0, y0] = toCanvas(clientX, clientY);
      return (x, y) => {
        const end = nv.screenXY2mm(...toCanvas(x, y));
        const start = nv.screenXY2mm(x0, y0, end[3]);
        if (![...end.slice(0, 3), ...start.slice(0, 3)].every(Number.isFinite)) return;
        nv.setPan2Dxyzmm([0, 1, 2].map((a) => at[a] + at[3] * (end[a] - start[a])).concat(at[3]));
      };
    },
    /** "multiplanar" (selecting) or "axial" (labelling: one large tile to paint on). */
    setLayout(layout) {
      nv.resizeListener(); // the frame's size may have changed with the layout: follow it now
      nv.setSliceType(layout === "axial" ? SLICE_TYPE.AXIAL : SLICE_TYPE.MULTIPLANAR);
    },
    /** The labels' opacity (0..1) and which classes (a Set of 1-3) show, as the canvas overlay's
     * controls say: the drawing colormap's alphas, re-uploaded (no volume redraw). */
    setOverlay(opacity, visible) {
      const lut = nv.drawLut.lut;
      for (const c of [1, 2, 3]) lut[4 * c + 3] = visible.has(c) ? DRAW_COLORMAP.A[c] : 0;
      nv.drawOpacity = opacity;
      nv.refreshColormaps();
      nv.drawScene();
    },
    /** Empty the drawing layer (a new session). */
    clearLabels() { nv.drawBitmap.fill(0); nv.refreshDrawing(true); },
    /** Voxels per class 1-3 in the drawing layer. */
    labelCounts() {
      const n = [0, 0, 0, 0];
      for (const x of nv.drawBitmap) n[x] += 1;
      return n.slice(1);
    },
  };
  nv.onLocationChange = (msg) => {
    const { k, row, col } = fromRas(meta.shape, flips, ...msg.vox);
    if (k < 0 || row < 0 || col < 0 || k >= nz || row >= ny || col >= nx) return;
    onLocation({ k, row, col, hu: msg.values.length ? msg.values[0].value : null, programmatic: view.programmatic });
  };
  return view;
}
