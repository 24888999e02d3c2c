// The web extension's pure functions on what the Python side really sends (fixture written by
// tests/test_web.py: an edit_summary of a real edit and prompt_tokens of a real prompt).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fmt, summaryRows, wordsFromTokens } from "../../web/concept_edit_format.js";

const fx = JSON.parse(readFileSync(process.env.CE_WEB_FIXTURE, "utf8"));

test("summaryRows lists what the edit did", () => {
  const rows = Object.fromEntries(summaryRows(fx.summary));
  assert.equal(rows.method, `uce · ${fx.summary.family}`);
  assert.equal(rows.concepts, fx.summary.concepts.join("; "));
  assert.equal(rows.preserve, fx.summary.preserve.join(", "));
  assert.equal(rows.layers, `${fx.summary.layers} (unet ${fx.summary.layers})`);
  assert.equal(rows.rank, String(fx.summary.max_rank));
  assert.match(rows["residual error"], /^mean [0-9.e-]+, max [0-9.e-]+$/);
  assert.equal(rows.base, fx.summary.base_fingerprint);
  assert.ok(!("saved" in rows) && !("file" in rows));
});

test("summaryRows of an empty summary is empty", () => {
  assert.deepEqual(summaryRows({}), []);
});

test("fmt", () => {
  assert.equal(fmt(null), "–");
  assert.equal(fmt(3), "3");
  assert.equal(fmt(0.123456), "0.1235");
  assert.equal(fmt("x"), "x");
});

test("wordsFromTokens joins sub-word tokens into the prompt's words", () => {
  assert.deepEqual(wordsFromTokens(fx.tokens), fx.words);
});
