"""HTTP routes for the web extension (registered only when running inside ComfyUI).

GET /concept_edit/tokens?text=...  ->  {"tokens": [{"index", "id", "text", "word_end"}], "words": [...]}
(the tokenization of ComfyUI's SD CLIP tokenizer, so the picker shows what the model sees).
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def _tokenizer():
    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    path = os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")
    return CLIPTokenizer.from_pretrained(path)


def tokens_payload(tokenizer, text: str) -> dict:
    from ..hooks.attention_maps import prompt_tokens

    toks = prompt_tokens(tokenizer, text[:2000])
    words, cur = [], ""
    for t in toks:
        cur += t["text"]
        if t["word_end"]:
            words.append(cur)
            cur = ""
    if cur:
        words.append(cur)
    return {"tokens": toks, "words": words}


def register() -> bool:
    try:
        from aiohttp import web
        from server import PromptServer
    except Exception:
        return False
    inst = getattr(PromptServer, "instance", None)
    if inst is None:
        return False

    @inst.routes.get("/concept_edit/tokens")
    async def tokens(request):
        text = request.rel_url.query.get("text", "")
        try:
            return web.json_response(tokens_payload(_tokenizer(), text))
        except Exception as e:  # pragma: no cover - reported to the browser
            return web.json_response({"error": str(e)}, status=500)

    return True
