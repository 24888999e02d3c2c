// Screenshots for the template browser's thumbnails: each example workflow loaded on the canvas of a
// real ComfyUI (headless Chromium), fitted to the view, saved as <out dir>/<workflow>.png.
//
//   node thumbnails.mjs <comfyui url> <out dir> <workflow.json>...
//
// Run through make_thumbnails.py, which starts the server. Prints one JSON line; exits non-zero on failure.
import { launchChromium } from "./chromium.mjs";
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";

const [url, outDir, ...workflows] = process.argv.slice(2);
const result = { ok: false, written: [] };
const browser = await launchChromium();
try {
  // large enough that the graphs fit near zoom 1 (legible); make_thumbnails.py scales the image down
  const page = await browser.newPage({ viewport: { width: 1920, height: 1200 } });
  await page.goto(url, { waitUntil: "load", timeout: 120_000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 120_000 });
  for (let i = 0; i < 3; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(200); }
  for (const file of workflows) {
    const wf = JSON.parse(readFileSync(file, "utf8"));
    await page.evaluate(async (w) => { await window.app.loadGraphData(w); }, wf);
    await page.waitForTimeout(500);
    // fit every node into the canvas: screen = (pos + offset) * scale
    await page.evaluate(() => {
      const canvas = window.app.canvas, nodes = window.app.graph._nodes;
      const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 30));
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
      const el = canvas.canvas, W = el.clientWidth, H = el.clientHeight, m = 40;
      const scale = Math.min(W / (x1 - x0 + 2 * m), H / (y1 - y0 + 2 * m), 1.0);
      canvas.ds.scale = scale;
      canvas.ds.offset = [(W / scale - (x1 - x0)) / 2 - x0, (H / scale - (y1 - y0)) / 2 - y0];
      canvas.setDirty(true, true);
    });
    await page.waitForTimeout(500);
    const out = join(outDir, basename(file).replace(/\.json$/, ".png"));
    await page.locator("canvas#graph-canvas").screenshot({ path: out });
    result.written.push(out);
  }
  result.ok = result.written.length === workflows.length;
} catch (e) {
  result.failure = String(e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
