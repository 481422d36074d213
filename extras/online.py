"""extras/online.py: the candidates' distributions computed inside the training loop (train.py
--online).

Why it exists: data.py stores every model's top-K for every window once, and train.py reads them
back, which is the path to learn from (each stage can be looked at on disk). A user with GPUs to
spare and no disk for the stored distributions (at paper scale, tens of gigabytes) can instead run
the frozen models inside the loop: train.py --online builds the same items from the windows' text on
the fly.

What it holds: OnlineCandidates, the same items() as extras/stored_candidates.py: a frozen copy of
the target and every source run over each window (data.window_topk), the sources aligned onto the
target with the same code and settings as data.py (a source's stored aligned/<name>/settings.json
when there is one, the nanofuse preset otherwise). On a data folder made with `data.py dists
--sample N` (its models' info.json say so) every model's labels are N sampled ids instead of the
top-K, drawn from the uniforms compute_dists draws (seeded by the window's tokens and the model's
name in the folder: "target", or the source's), so the ids are the stored ones; --topk is then
unused. tests/parity/test_labels_in_place.py, tests/parity/test_train_parity.py and
tests/robustness/test_data_pipeline.py check that it gives what the stored path gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import align
import common
import data
import fusellm
from extras import ranks, storage
from extras.emitted_tokens import context_labels
from extras.data_cli import source_name
from extras.fast_align import PairCosts


def folder_name(out, path) -> str:
    """The name a source model has in data folder `out`: the folder under out/models/ whose
    info.json names this model (data.py dists --name may differ from the path's name, as demo.py
    real's "source" does), else the name `data.py all` would give it. Its stored alignment settings
    and its sampling seed are found by that name."""
    import json
    for info in sorted(Path(out, "models").glob("*/info.json")):
        try:
            if json.loads(info.read_text()).get("model") == str(path):
                return info.parent.name
        except ValueError:              # a damaged info.json is named where it is read
            continue
    return source_name(path)


class OnlineCandidates:
    """Candidates computed inside the loop: a frozen copy of the target and every source run over
    each window, the sources carried onto the target's tokens as data.py carries them."""

    def __init__(self, cfg, tok, device):
        m = data.load_manifest(cfg.data)
        sources = list(cfg.sources) or m["sources"]
        # --sample N: the folder's models store N drawn ids per token (0: the top-K, --topk)
        self.sample = storage.folder_sample(cfg.data)
        self.device, self.tok, self.k = device, tok, self.sample or cfg.topk
        dtype = common.dtype_for(device)
        self.models = {"target": fusellm.load(cfg.target, device, dtype)}
        self.names = ["target"]
        for path in sources:
            name = folder_name(cfg.data, path)
            self.models[name] = fusellm.load(path, device, dtype)
            self.names.append(name)
        tv = align.normalized_vocab(tok)
        self.align, self.settings = {}, {}
        for name in self.names[1:]:
            s_tok = self.models[name][1]
            self.settings[name] = storage.stored_align_settings(cfg.data, name)
            kind, ties = self.settings[name]["vocab_map"], self.settings[name]["map_ties"]
            # the vocab map: built once, on rank 0; the other ranks read it from the cache
            vmap = ranks.first_rank_then_all(
                lambda: align.vocab_map(s_tok, tok, kind, Path(cfg.data) / "cache", ties))
            labels = context_labels(s_tok, tok, vmap, self.settings[name])   # as align_source
            self.align[name] = (vmap, align.normalized_vocab(s_tok), tv, PairCosts(), labels)
        self.out = cfg.data

    def items(self, picked):
        wanted = {s for s, _ in picked}
        shards = {s: storage.read_windows(self.out, s) for s in wanted}          # each file once
        texts = [shards[s][w]["text"] for s, w in picked]
        items = [{"text": t, "tokens": self.tok.encode(t), "sources": {}} for t in texts]
        model, tok = self.models["target"]
        windows = [it["tokens"] for it in items]
        ids, lps, ces = data.window_topk(model, tok, windows, self.k, self.device,
                                         sample=self.sample, seed="target")    # as compute_dists
        for it, i_, l_, c_ in zip(items, ids, lps, ces):
            n_bytes = len(it["text"].encode())
            per_byte = data.ce_per_byte(c_, len(it["tokens"]), tok.bos_id is not None, n_bytes)
            it["target"] = {"topk_ids": i_.astype(np.int64), "topk_logprobs": l_, "ce": c_,
                            "ce_per_byte": per_byte}
        for name in self.names[1:]:
            model, s_tok = self.models[name]
            vmap, sv, tv, costs, labels = self.align[name]
            s_ids = [s_tok.encode(it["text"]) for it in items]
            ids, lps, ces = data.window_topk(model, s_tok, s_ids, self.k, self.device,
                                             sample=self.sample, seed=name)
            for it, si, i_, l_, c_ in zip(items, s_ids, ids, lps, ces):
                tr = data.align_window(si, it["tokens"], i_.astype(np.int64), l_, vmap, sv, tv,
                                       costs, self.settings[name], labels)
                n_bytes = len(it["text"].encode())
                per_byte = data.ce_per_byte(c_, len(si), s_tok.bos_id is not None, n_bytes)
                rows = data.padded(tr, self.k)            # counts (n,), ids and logprobs (n, K)
                it["sources"][name] = {**rows, "ce": c_, "ce_per_byte": per_byte}
        return items
