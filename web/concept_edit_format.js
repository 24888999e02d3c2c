// Pure functions of the ConceptEdit web extension (no DOM, no ComfyUI imports), so that
// tests/web/*.test.mjs can run them under node. ComfyUI loads this file too; it registers nothing.

export function fmt(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x === "number") return Number.isInteger(x) ? String(x) : x.toPrecision(digits);
  return String(x);
}

// An edit summary (nodes/common.edit_summary) as [label, value] rows for the node's panel.
export function summaryRows(s) {
  const rows = [];
  if (s.method) rows.push(["method", `${s.method}${s.family ? " · " + s.family : ""}`]);
  if (s.concepts && s.concepts.length) rows.push(["concepts", s.concepts.join("; ")]);
  if (s.preserve && s.preserve.length) rows.push(["preserve", s.preserve.join(", ")]);
  if (s.layers !== undefined) {
    const comps = s.components ? Object.entries(s.components).map(([k, v]) => `${k} ${v}`).join(", ") : "";
    rows.push(["layers", `${s.layers}${comps ? " (" + comps + ")" : ""}`]);
  }
  if (s.max_rank !== undefined) rows.push(["rank", fmt(s.max_rank)]);
  if (s.residual_error) rows.push(["residual error", `mean ${fmt(s.residual_error.mean, 3)}, max ${fmt(s.residual_error.max, 3)}`]);
  if (s.strength !== undefined) rows.push(["strength", fmt(s.strength)]);
  if (s.strength_model !== undefined) rows.push(["strength", `model ${fmt(s.strength_model)}, clip ${fmt(s.strength_clip)}`]);
  if (s.base) rows.push(["computed on", s.base === "patched" ? "patched weights" : "original weights"]);
  if (s.saved) rows.push(["saved", s.saved + (s.max_rel_error ? ` (rank err ${fmt(s.max_rel_error, 3)})` : "")]);
  if (s.file) rows.push(["file", s.file]);
  if (s.seconds !== undefined && s.seconds !== null) rows.push(["time", `${fmt(s.seconds, 3)} s`]);
  if (s.base_fingerprint) rows.push(["base", s.base_fingerprint]);
  return rows;
}

// The prompt's words from its CLIP tokens (hooks/attention_maps.prompt_tokens: text, word_end).
export function wordsFromTokens(tokens) {
  const words = [];
  let cur = "";
  for (const t of tokens) {
    cur += t.text;
    if (t.word_end) { words.push(cur); cur = ""; }
  }
  if (cur) words.push(cur);
  return words;
}
