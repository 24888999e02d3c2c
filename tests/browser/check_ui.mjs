// Headless Chromium check of the ConceptEdit web extension inside a running ComfyUI.
//
//   node check_ui.mjs <comfyui url> <edit workflow (UI json)> <attention workflow (UI json)> <screenshot.png>
//
// 1. the page loads and our extension script is served and registered, with no console errors
//    or uncaught exceptions coming from it;
// 2. the Attention Heatmaps node's word picker lists the prompt's words and a click toggles one
//    into the "words" field;
// 3. after queueing the edit workflow, the edit node shows the edit summary panel;
// 4. a screenshot is saved.
// Prints one JSON line with the findings; exits non-zero on failure.
import { launchChromium } from "./chromium.mjs";
import { readFileSync } from "node:fs";

const [url, editWf, attnWf, shot] = process.argv.slice(2);
const TIMEOUT = Number(process.env.CE_BROWSER_TIMEOUT_MS || 1_500_000);
const result = { ok: false, errors: [], extensionErrors: [], steps: [] };

function fromExtension(text, location) {
  const s = `${text} ${location?.url || ""}`;
  return /concept[_-]?edit/i.test(s);
}

const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  let scriptServed = false;
  page.on("response", (r) => { if (/extensions\/ConceptEdit\/concept_edit\.js/.test(r.url()) && r.ok()) scriptServed = true; });
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const e = { text: m.text(), url: m.location()?.url };
    result.errors.push(e);
    if (fromExtension(e.text, m.location())) result.extensionErrors.push(e);
  });
  page.on("pageerror", (err) => {
    const e = { text: String(err.stack || err) };
    result.errors.push(e);
    if (fromExtension(e.text)) result.extensionErrors.push(e);
  });

  await page.goto(url, { waitUntil: "load", timeout: 120_000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 120_000 });
  // extensions register during app setup; wait until ours is in the list
  await page.waitForFunction(() => {
    const exts = window.app.extensions || window.app.extensionManager?.extensions || [];
    return Array.from(exts).some((e) => e.name === "ConceptEdit.ui");
  }, null, { timeout: 60_000 });
  result.steps.push({ extensionRegistered: true, scriptServed });

  // -- word picker on the attention workflow (no run needed)
  const attn = JSON.parse(readFileSync(attnWf, "utf8"));
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, attn);
  const picked = await page.evaluate(async () => {
    const node = window.app.graph._nodes.find((n) => n.type === "ConceptEditAttentionHeatmaps");
    const words = node.widgets.find((w) => w.name === "words");
    words.value = "";
    const btn = node.widgets.find((w) => w.name === "pick words");
    await btn.callback();
    await new Promise((r) => setTimeout(r, 300));
    const chips = Array.from(document.querySelectorAll(".concept-edit-words .concept-edit-chip"));
    const cat = chips.find((c) => c.dataset.word === "cat");
    cat?.click();
    return { chips: chips.map((c) => c.dataset.word), words: words.value };
  });
  result.steps.push({ picker: picked });
  if (!picked.chips.includes("cat") || picked.words !== "cat") throw new Error("word picker failed: " + JSON.stringify(picked));

  // -- run the edit workflow and wait for the summary panel
  const edit = JSON.parse(readFileSync(editWf, "utf8"));
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, edit);
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  await page.waitForFunction(() => {
    const el = document.querySelector(".concept-edit-summary[data-node-type$='Erase'] td[data-key='layers']");
    return el && el.textContent.trim().length > 0;
  }, null, { timeout: TIMEOUT, polling: 1000 });
  const summary = await page.evaluate(() => {
    const rows = {};
    for (const td of document.querySelectorAll(".concept-edit-summary[data-node-type$='Erase'] td[data-key]")) rows[td.dataset.key] = td.textContent;
    return rows;
  });
  result.steps.push({ summary });
  // frame the edit node for the screenshot
  await page.evaluate(() => {
    const n = window.app.graph._nodes.find((x) => /^ConceptEdit.*Erase$/.test(x.type));
    const ds = window.app.canvas.ds;
    ds.scale = 1.0;
    ds.offset = [-n.pos[0] + 420, -n.pos[1] + 60];
    window.app.canvas.setDirty(true, true);
  });
  // close first-run dialogs (template browser etc.) so the canvas is visible
  for (let i = 0; i < 3; i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
  await page.evaluate(() => {
    for (const b of document.querySelectorAll(".p-dialog-header-close, .p-dialog-close-button, [aria-label='Close']")) b.click();
  });
  await page.waitForTimeout(1000);
  result.dialogsOpen = await page.evaluate(() => document.querySelectorAll(".p-dialog-mask").length);
  await page.screenshot({ path: shot });
  result.screenshot = shot;
  result.ok = result.extensionErrors.length === 0 && !!summary.layers && !!summary.concepts;
} catch (e) {
  result.failure = String(e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
