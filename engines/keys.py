"""Prompts -> key matrices: token selection over an EditableModel, with encoding cached per text.

Two token selections, as in UCE:
- ``last``: the key at the last token of the concept inside its prompt. CLIP's text encoder
  is causal, so that key depends only on the tokens up to it: we encode just that prefix.
- ``aligned``: UCE's original choice: from the last subject token through EOS and the padding,
  source and destination aligned from their subject tokens (needs full 77-token encodings).
- ``all`` (FLUX/SD3 T5 keys only, adapters/mmdit_model.py): ``aligned`` plus the tokens before the
  subject, which a bidirectional encoder computes with the subject in view.
"""
from __future__ import annotations

import torch

from ..adapters.base import EditableModel, content_ids
from ..core.prompts import Prompt


class UnknownConceptError(ValueError):
    pass


class KeyEncoder:
    """Turns prompts into keys through ``model``, encoding each distinct token sequence once."""

    def __init__(self, model: EditableModel):
        self.model = model
        tok = model.tokenizer
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _content_ids(self, p: Prompt) -> tuple[list[int], int]:
        """(ids of the whole text, number of ids up to and including the subject)."""
        ids = content_ids(self.model, p.text)
        if self.eos in ids:  # tokenizers map words they do not know to the unknown (=EOS) token
            raise UnknownConceptError(f"prompt {p.text!r} contains words this model's tokenizer does not know")
        if p.subject_end == len(p.text):
            n_sub = len(ids)  # the concept ends the prompt: no second tokenization
        else:
            n_sub = len(self.model.token_ids(p.text[: p.subject_end])) if p.subject_end else 0
        return ids, n_sub

    def _encode(self, seqs: list[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
        """States for each sequence; encodes (in one model call) only those not seen before."""
        todo = [q for q in dict.fromkeys(seqs) if q not in self._cache]
        if todo:
            self._cache.update(zip(todo, self.model.encode_ids([list(q) for q in todo])))
        return self._cache

    def _last_seqs(self, prompts: list[Prompt], empty_all_tokens: bool):
        seqs, owners = [], []
        for i, p in enumerate(prompts):
            ids, n_sub = self._content_ids(p)
            if n_sub == 0 and empty_all_tokens:
                seqs += [(self.bos,), (self.bos, *ids, self.eos)]
                owners += [i, i]
            else:
                seqs.append((self.bos, *ids[:n_sub]))
                owners.append(i)
        return seqs, owners

    def prefetch(self, *groups: tuple[list[Prompt], bool]) -> None:
        """Encode the last-token sequences of several prompt groups ``(prompts, empty_all_tokens)``
        in one model call, so later lookups are free (one batching pass, one autocast region)."""
        self._encode([q for prompts, empty in groups for q in self._last_seqs(prompts, empty)[0]])

    def last_token_keys(self, prompts: list[Prompt], *, empty_all_tokens: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Keys at each prompt's last subject token; returns (keys, owner index per key row).

        A prompt with no subject tokens (the empty concept) yields its BOS key, or with
        ``empty_all_tokens`` both BOS and EOS (used for the "" preserve concept).
        """
        seqs, owners = self._last_seqs(prompts, empty_all_tokens)
        cache = self._encode(seqs)
        return torch.stack([cache[q][-1] for q in seqs]), owners

    def _full(self, prompts: list[Prompt]):
        info = [self._content_ids(p) for p in prompts]
        padded = [tuple(self.model.padded_ids(p.text)) for p in prompts]
        return info, padded, self._encode(padded)

    def aligned_keys(self, src: list[Prompt], dst: list[Prompt], *, prefix: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """UCE's aligned selection: rows from each subject token to the end, source and destination
        trimmed to equal length. Returns (source keys, destination keys, owner index per row)."""
        _refuse_prefix(prefix)
        if len(src) != len(dst):
            raise ValueError("aligned keys need one destination prompt per source prompt")
        L = self.model.max_tokens
        s_info, s_pad, s_cache = self._full(src)
        d_info, d_pad, d_cache = self._full(dst)
        K, T, owners = [], [], []
        for i in range(len(src)):
            a, b = s_info[i][1], d_info[i][1]  # subject token index (BOS is 0)
            far = max(a, b)
            K.append(s_cache[s_pad[i]][a : L - (far - a)])
            T.append(d_cache[d_pad[i]][b : L - (far - b)])
            owners += [i] * (L - far)
        return torch.cat(K), torch.cat(T), owners

    def all_token_keys(self, prompts: list[Prompt], *, prefix: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Rows from each prompt's subject token to the end of the padded sequence (aligned preserve)."""
        _refuse_prefix(prefix)
        info, padded, cache = self._full(prompts)
        rows, owners = [], []
        for i, (_, n_sub) in enumerate(info):
            rows.append(cache[padded[i]][n_sub:])
            owners += [i] * (self.model.max_tokens - n_sub)
        return torch.cat(rows), owners


def _refuse_prefix(prefix: bool) -> None:
    if prefix:
        raise ValueError("token 'all' adds the states before the subject, which a causal CLIP encoder computes without "
                         "seeing the subject (they equal the destination's): use 'last' or 'aligned' on this model; "
                         "'all' is for the T5 keys of FLUX and SD3")
