// ConceptEdit web extension for ComfyUI.
// - Edit / Load / Save Concept Delta nodes: after a run, show what the edit did
//   (concepts, layers, rank, residual error) in a panel on the node.
// - Attention Heatmaps node: a word picker built from the prompt's CLIP tokens; clicking a
//   word toggles it in the node's "words" field.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { summaryRows, wordsFromTokens } from "./concept_edit_format.js";

const EXT = "ConceptEdit.ui";
const SUMMARY_CLASS = "concept-edit-summary";
const PICKER_CLASS = "concept-edit-words";

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

function panelWidget(node, name, cls) {
  let w = node.widgets?.find((x) => x.name === name);
  if (w) return w;
  const div = el("div", { class: cls, style: {
    font: "11px monospace", color: "var(--input-text, #ddd)", background: "rgba(0,0,0,0.25)",
    borderRadius: "4px", padding: "4px 6px", overflow: "auto", whiteSpace: "normal", boxSizing: "border-box",
  } });
  w = node.addDOMWidget(name, "concept_edit_panel", div, { serialize: false, hideOnZoom: false,
    getMinHeight: () => Math.min(240, 14 + 16 * (w.ceRows || 2)), getMaxHeight: () => 240 });
  w.serialize = false;
  return w;
}

function showSummary(node, summary) {
  const w = panelWidget(node, "concept_edit_summary", SUMMARY_CLASS);
  const div = w.element;
  div.replaceChildren();
  const table = el("table", { style: { borderCollapse: "collapse", width: "100%" } });
  for (const [k, v] of summaryRows(summary)) {
    const tr = el("tr");
    tr.appendChild(el("td", { style: { opacity: "0.7", paddingRight: "6px", verticalAlign: "top", whiteSpace: "nowrap" } }, k));
    tr.appendChild(el("td", { "data-key": k }, v));
    table.appendChild(tr);
  }
  div.appendChild(table);
  div.dataset.layers = String(summary.layers ?? "");
  div.dataset.nodeType = node.type;
  w.ceRows = table.rows.length;
  fitNode(node);
}

function fitNode(node) {
  // grow the node so the panel shows every row (never shrink what the user sized)
  const want = node.computeSize?.();
  if (want) node.setSize([Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1])]);
  node.setDirtyCanvas?.(true, true);
}

function wordsWidget(node) { return node.widgets?.find((w) => w.name === "words"); }
function promptWidget(node) { return node.widgets?.find((w) => w.name === "prompt"); }

function chosenWords(node) {
  const w = wordsWidget(node);
  return (w?.value || "").split(",").map((s) => s.trim()).filter(Boolean);
}

function toggleWord(node, word) {
  const w = wordsWidget(node);
  if (!w) return;
  const cur = chosenWords(node);
  const i = cur.findIndex((x) => x.toLowerCase() === word.toLowerCase());
  if (i >= 0) cur.splice(i, 1); else cur.push(word);
  w.value = cur.join(", ");
  w.callback?.(w.value);
  node.setDirtyCanvas?.(true, true);
}

function renderPicker(node, words) {
  const w = panelWidget(node, "concept_edit_words", PICKER_CLASS);
  const div = w.element;
  div.replaceChildren();
  const chosen = new Set(chosenWords(node).map((s) => s.toLowerCase()));
  if (!words.length) div.appendChild(el("span", { style: { opacity: "0.7" } }, "type a prompt, then press “pick words”"));
  for (const word of words) {
    const on = chosen.has(word.toLowerCase());
    const chip = el("span", { class: "concept-edit-chip", "data-word": word, style: {
      display: "inline-block", margin: "2px", padding: "1px 6px", borderRadius: "8px", cursor: "pointer",
      background: on ? "#d97706" : "rgba(255,255,255,0.12)", color: on ? "#000" : "inherit",
    } }, word);
    chip.addEventListener("click", () => { toggleWord(node, word); renderPicker(node, words); });
    div.appendChild(chip);
  }
  w.ceRows = Math.max(2, Math.ceil(words.length / 6) + 1);
  fitNode(node);
}

async function fetchWords(text) {
  try {
    const r = await api.fetchApi(`/concept_edit/tokens?text=${encodeURIComponent(text)}`);
    if (r.ok) {
      const j = await r.json();
      if (j.words) return j.words;
    }
  } catch (e) { /* fall back to whitespace words */ }
  return text.toLowerCase().split(/[^\p{L}\p{N}']+/u).filter(Boolean);
}

const EDIT_NODE = /^ConceptEdit(.*(Erase|Replace|Moderate|Debias)|SaveDelta|LoadDelta)$/;

app.registerExtension({
  name: EXT,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name || "";
    if (EDIT_NODE.test(name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const s = message?.concept_edit?.[0];
        if (s) showSummary(this, s);
      };
    }
    if (name === "ConceptEditAttentionHeatmaps") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        const node = this;
        const btn = node.addWidget("button", "pick words", null, async () => {
          const text = promptWidget(node)?.value || "";
          renderPicker(node, await fetchWords(text));
        }, { serialize: false });
        btn.serialize = false;
        return r;
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const info = message?.concept_edit_attention?.[0];
        if (info?.tokens) renderPicker(this, wordsFromTokens(info.tokens));
      };
    }
  },
});
