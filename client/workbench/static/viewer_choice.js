// Which viewer the workbench shows: NiiVue (nvview.js) where the browser renders WebGL2 on a GPU,
// the canvas views alone where WebGL2 is missing or drawn in software (SwiftShader, llvmpipe,
// Microsoft's Basic Render Driver): there a NiiVue window change costs seconds (docs/WORKBENCH.md).
// `?viewer=niivue` or `?viewer=canvas` decides instead.

const SOFTWARE = [/swiftshader/i, /llvmpipe/i, /softpipe/i, /software/i, /basic render/i, /mesa offscreen/i];

/**
 * The choice for a `?viewer=` value and the WebGL2 renderer string (null: no WebGL2):
 * `{ viewer: "niivue" | "canvas", reason }`. Pure: the page passes what the browser says.
 */
export function chooseViewer(param, renderer) {
  if (param === "niivue") return { viewer: "niivue", reason: "asked for (?viewer=niivue)" };
  if (param === "canvas") return { viewer: "canvas", reason: "asked for (?viewer=canvas)" };
  if (renderer === null) return { viewer: "canvas", reason: "this browser has no WebGL2" };
  if (SOFTWARE.some((re) => re.test(renderer))) {
    return { viewer: "canvas", reason: `WebGL2 is drawn in software here (${renderer})` };
  }
  return { viewer: "niivue", reason: `WebGL2 on ${renderer}` };
}

/** What this browser's WebGL2 runs on (the unmasked renderer where the browser tells), or null. */
export function webgl2Renderer() {
  const gl = document.createElement("canvas").getContext("webgl2");
  if (!gl) return null;
  const info = gl.getExtension("WEBGL_debug_renderer_info");
  const name = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
  const lose = gl.getExtension("WEBGL_lose_context");
  if (lose) lose.loseContext(); // one probe context, given back at once
  return name;
}
