"""Regenerate the example workflows (ComfyUI UI format, what users drag onto the canvas).

    python -m concept_edit.example_workflows.build     # or: python example_workflows/build.py

Each workflow is described as a small graph below; widget values are listed in the order of
each node's widget inputs (the node's input order in ComfyUI's ``/object_info``; KSampler's seed is followed by its
"control after generate" value). The end-to-end test converts these UI files to API prompts
with the running server's ``/object_info``, so the files themselves are what gets tested.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly.safetensors"

# Built-in node signatures: (inputs [(name, type)], outputs [(name, type)]).
BUILTIN = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    # FLUX: the diffusion model, its two text encoders and its VAE come as separate files
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
}
DELTA = "CONCEPT_DELTA"
ATT = "CONCEPT_ATTENTION"
OURS = {
    "ConceptEditUCEErase": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("clip", "CLIP"), ("delta", DELTA)]),
    "ConceptEditUCEDebias": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("clip", "CLIP"), ("delta", DELTA)]),
    "ConceptEditSaveDelta": ([("delta", DELTA)], []),
    "ConceptEditLoadDelta": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("clip", "CLIP"), ("delta", DELTA)]),
    "ConceptEditAttentionCapture": ([("model", "MODEL")], [("model", "MODEL"), ("attention", ATT)]),
    "ConceptEditAttentionHeatmaps": ([("attention", ATT), ("images", "IMAGE"), ("clip", "CLIP")], [("heatmaps", "IMAGE")]),
}
SIGS = {**BUILTIN, **OURS}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets, pos, size=(320, 200), title=None):
        ins, outs = SIGS[type_]
        node = {
            "id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src, out_slot, dst, in_name):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = [i["name"] for i in d["inputs"]].index(in_name)
        lid = len(self.links) + 1
        typ = s["outputs"][out_slot]["type"]
        self.links.append([lid, src, out_slot, dst, slot, typ])
        s["outputs"][out_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid

    def to_json(self, note: str):
        for n in self.nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"concept_edit": {"description": note}, "ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


# UCE Erase widgets: concepts, concept_type, guide, preserve, lambda_, strength | erase_scale,
# preserve_scale, token, templates, layers, base
ERASE = ["Van Gogh", "style", "", "Claude Monet, Pablo Picasso", 0.5, 1.0, 1.0, 1.0, "last", "{}\na painting by {}", "kv", "patched"]
PROMPT = "a painting by Van Gogh of a cat in a field"
NEG = "blurry, low quality"


def sampler_chain(g, model_src, clip_src, vae_src, prompt, x, y, prefix, *, batch=1, seed=42):
    pos = g.add("CLIPTextEncode", [prompt], (x, y), (400, 160))
    neg = g.add("CLIPTextEncode", [NEG], (x, y + 190), (400, 120))
    lat = g.add("EmptyLatentImage", [512, 512, batch], (x, y + 340), (320, 110))
    ks = g.add("KSampler", [seed, "fixed", 20, 7.0, "euler", "normal", 1.0], (x + 430, y), (320, 270))
    dec = g.add("VAEDecode", [], (x + 780, y), (210, 50))
    save = g.add("SaveImage", [prefix], (x + 1010, y), (360, 380))
    g.link(clip_src[0], clip_src[1], pos, "clip")
    g.link(clip_src[0], clip_src[1], neg, "clip")
    g.link(model_src[0], model_src[1], ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae_src[0], vae_src[1], dec, "vae")
    g.link(dec, 0, save, "images")
    return dec


def erase_and_save():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", [CKPT], (0, 0), (320, 100))
    ed = g.add("ConceptEditUCEErase", ERASE, (360, 0), (380, 720))
    sv = g.add("ConceptEditSaveDelta", ["concept_edit/erase_van_gogh", 0, "lora"], (780, 0), (320, 130))
    g.link(ck, 0, ed, "model")
    g.link(ck, 1, ed, "clip")
    g.link(ed, 2, sv, "delta")
    sampler_chain(g, (ed, 0), (ed, 1), (ck, 2), PROMPT, 0, 800, "concept_edit/erased")
    return g.to_json("Erase an artist's style (UCE) and save the edit as a LoRA in models/loras/concept_edit/; "
                     "the edited model also samples the artist's prompt.")


def load_and_sample():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", [CKPT], (0, 0), (320, 100))
    ld = g.add("ConceptEditLoadDelta", ["concept_edit/erase_van_gogh_00001_.safetensors", 1.0, 1.0], (360, 0), (360, 200))
    g.link(ck, 0, ld, "model")
    g.link(ck, 1, ld, "clip")
    sampler_chain(g, (ld, 0), (ld, 1), (ck, 2), PROMPT, 0, 260, "concept_edit/loaded_delta")
    return g.to_json("Load a saved concept delta (a LoRA written by Save Concept Delta) with a strength and sample; "
                     "the node shows the delta's metadata.")


def attention_before_after():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", [CKPT], (0, 0), (320, 100))
    ed = g.add("ConceptEditUCEErase", ERASE, (0, 150), (380, 720))
    g.link(ck, 0, ed, "model")
    g.link(ck, 1, ed, "clip")
    rows = []
    for i, (label, msrc) in enumerate([("before", (ck, 0)), ("after", (ed, 0))]):
        y = i * 700
        cap = g.add("ConceptEditAttentionCapture", [], (420, y), (260, 60), title=f"Attention Capture ({label})")
        g.link(msrc[0], msrc[1], cap, "model")
        dec = sampler_chain(g, (cap, 0), (ck, 1), (ck, 2), PROMPT, 720, y, f"concept_edit/attn_{label}_image")
        hm = g.add("ConceptEditAttentionHeatmaps", [PROMPT, "Van Gogh, cat", "positive", True, 0.6], (2120, y), (380, 330),
                   title=f"Attention Heatmaps ({label})")
        g.link(cap, 1, hm, "attention")
        g.link(dec, 0, hm, "images")
        g.link(ck, 1, hm, "clip")
        sv = g.add("SaveImage", [f"concept_edit/attn_{label}"], (2540, y), (360, 380))
        g.link(hm, 0, sv, "images")
        rows.append(hm)
    return g.to_json("Cross-attention heatmaps for 'Van Gogh' and 'cat' before and after erasing Van Gogh's style "
                     "(same seed): after the edit the artist's tokens no longer steer the image.")


def debias():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", [CKPT], (0, 0), (320, 100))
    db = g.add("ConceptEditUCEDebias", ["doctor", "male, female", "0.5, 0.5", "", "", 0.5, 1.0, 1.0, 1.0, "last", "{}\na photo of a {}", "kv", "patched"],
               (360, 0), (380, 720))
    g.link(ck, 0, db, "model")
    g.link(ck, 1, db, "clip")
    sampler_chain(g, (db, 0), (db, 1), (ck, 2), "a photo of a doctor", 0, 800, "concept_edit/debias_doctor", batch=4)
    return g.to_json("Debias 'doctor' towards equal male/female proportions (UCE debias; alphas start from the ratios — "
                     "fit calibrated alphas with concept_edit.engines.debias.fit_debias and paste them in).")


def flux_erase():
    """UCE on FLUX: the node edits txt_in (T5 states) and vector_in (CLIP-L pooled); docs/mmdit.md."""
    g = Graph()
    unet = g.add("UNETLoader", ["flux1-dev.safetensors", "default"], (0, 0), (320, 90))
    te = g.add("DualCLIPLoader", ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"], (0, 130), (320, 130))
    vae = g.add("VAELoader", ["ae.safetensors"], (0, 300), (320, 60))
    ed = g.add("ConceptEditUCEErase", ERASE, (360, 0), (380, 720))
    sv = g.add("ConceptEditSaveDelta", ["concept_edit/flux_erase_van_gogh", 0, "lora"], (780, 0), (320, 130))
    g.link(unet, 0, ed, "model")
    g.link(te, 0, ed, "clip")
    g.link(ed, 2, sv, "delta")
    pos = g.add("CLIPTextEncode", [PROMPT], (0, 800), (400, 160))
    guid = g.add("FluxGuidance", [3.5], (430, 800), (300, 60))
    neg = g.add("CLIPTextEncode", [""], (0, 990), (400, 120))
    lat = g.add("EmptySD3LatentImage", [1024, 1024, 1], (0, 1140), (320, 110))
    ks = g.add("KSampler", [42, "fixed", 20, 1.0, "euler", "simple", 1.0], (760, 800), (320, 270))
    dec = g.add("VAEDecode", [], (1110, 800), (210, 50))
    save = g.add("SaveImage", ["concept_edit/flux_erased"], (1340, 800), (360, 380))
    g.link(ed, 1, pos, "clip")
    g.link(ed, 1, neg, "clip")
    g.link(pos, 0, guid, "conditioning")
    g.link(ed, 0, ks, "model")
    g.link(guid, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    return g.to_json("Erase an artist's style from FLUX.1 (UCE on its text readers: txt_in reads the T5 states, "
                     "vector_in the CLIP-L pooled vector; the UCE node edits FLUX and SD3 MODEL/CLIP pairs as they come "
                     "from ComfyUI's loaders), save the edit as a LoRA and sample the artist's prompt (cfg 1, guidance "
                     "3.5). Pick your FLUX files in the three loaders.")


WORKFLOWS = {
    "erase_artist_style_save_lora.json": erase_and_save,
    "load_delta_and_sample.json": load_and_sample,
    "attention_maps_before_after_edit.json": attention_before_after,
    "debias_profession.json": debias,
    "flux_erase_artist_style.json": flux_erase,
}


def main():
    for name, fn in WORKFLOWS.items():
        (HERE / name).write_text(json.dumps(fn(), indent=1) + "\n")
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
