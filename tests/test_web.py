"""The web extension's pure functions (web/concept_edit_format.js) under node's test runner, fed what
the Python side really produces."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_web_format_functions(tiny, tmp_path):
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines import compute_delta
    from concept_edit.hooks.attention_maps import prompt_tokens
    from concept_edit.nodes.common import edit_summary, residual_errors

    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"erase": "Van Gogh", "type": "style"}], "preserve": ["Monet"]})
    delta = compute_delta(model, plan, progress=False)
    summary = edit_summary(delta, plan, residual_errors(model, plan, delta))
    prompt = "a painting by kandinsky of a cat"
    tokens = prompt_tokens(pipe.tokenizer, prompt)
    assert len(tokens) > len(prompt.split())  # "kandinsky" is two tokens: the join is exercised
    fixture = tmp_path / "fixture.json"
    fixture.write_text(json.dumps({"summary": summary, "tokens": tokens, "words": prompt.split()}))
    r = subprocess.run(["node", "--test", str(HERE / "web")], capture_output=True, text=True, timeout=120,
                       env={"PATH": os.environ["PATH"], "CE_WEB_FIXTURE": str(fixture)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "# pass 4" in r.stdout and "# fail 0" in r.stdout, r.stdout[-2000:]
