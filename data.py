"""
data.py: from a corpus to fusion-ready data.

    python data.py windows --corpus CORPUS --target TARGET --sources A B --data DATA
    python data.py dists   --data DATA --model TARGET --name target     # and once per source
    python data.py align   --data DATA --name A [--align nanofuse|paper|official] [--vocab-map em]
    python data.py all     --corpus CORPUS --target TARGET --sources A B --data DATA

1. windows: cut the corpus (.txt, .jsonl, or a folder of them) into text windows that every
   tokenizer turns into at most seq_len tokens (BOS included), so all models see the same text; in
   shards of a fixed size, whatever the number of processes that run later.
2. dists: per model (bf16 on GPU, fp32 on CPU), at each of its tokens, the top-K next-token ids
   with log-probs over its whole vocabulary, and each window's cross-entropy (CE).
3. align: a source's top-K carried onto the target's tokens and vocabulary by one of align.py's
   presets (ours, the paper's or the official code's), with diagnostics.
Then FusionData reads it all back, window by window, for train.py.

Every shard is written under a temporary name and renamed, and a rerun skips finished shards: a
kill loses at most the shard in progress. Under torchrun (extras/ranks.py) each rank takes every
N-th shard; what all share (windows, vocab maps, diagnostics) rank 0 builds alone while the others
wait; the output is byte for byte one process's. A source added later needs only its dists + align.

Storage (per model, per token; extras/storage.py): top-K ids in the narrowest unsigned type,
log-probs in uint8 steps of 1/16 nat (or fp16: --logprob-bits 16); an aligned source's in uint8
(fp16 if sampled), as padded rows with a count per token (`padded`); each shard a compressed .npz.
The model's own tokens are not stored: re-encoded from the text, checked by CRC.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

import align
import common


class DataError(ValueError):
    """Bad corpus, bad data folder, or a stage run out of order; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# 1. Corpus -> windows


def fits(text: str, tokenizers, seq_len: int) -> int:
    """The largest overflow (tokens beyond seq_len, BOS counted) over the tokenizers; <= 0: fits."""
    return max(len(t.encode(text)) + (t.bos_id is not None) - seq_len for t in tokenizers)


def split_document(doc: str, tokenizers, seq_len: int) -> list[str]:
    """Cut a document into consecutive windows (their concatenation is the document) that every
    tokenizer encodes into at most seq_len tokens, BOS included. The cut is estimated from each
    tokenizer's characters per token on this document, moved back to just after a newline or space
    in the window's second half when there is one, then checked exactly and shrunk until it fits."""
    budget = seq_len - 1
    if budget < 1:
        raise DataError(f"seq_len={seq_len} leaves no room for text")
    counts = [max(1, len(t.encode(doc))) for t in tokenizers]
    if all(c + 1 <= seq_len for c in counts):
        return [doc]
    chars_per_token = min(len(doc) / c for c in counts)
    windows, pos = [], 0
    while pos < len(doc):
        end = min(len(doc), pos + max(1, int(budget * chars_per_token * 0.97)))
        while True:
            if end < len(doc):
                half = pos + (end - pos) // 2
                cut = max(doc.rfind("\n", half, end), doc.rfind(" ", half, end))
                if cut > pos:
                    end = cut + 1
            over = fits(doc[pos:end], tokenizers, seq_len)
            if over <= 0:
                break
            if end - pos <= 1:
                raise DataError(f"a single character {doc[pos]!r} needs more than "
                                f"seq_len={seq_len} tokens")
            end = pos + max(1, int((end - pos) * (1 - over / seq_len) * 0.95))
        windows.append(doc[pos:end])
        pos = end
    return windows


def build_windows(corpus, target_dir, source_dirs, out, seq_len=2048, shard_windows=256,
                  text_field="text", txt_docs="file", quiet=False) -> dict:
    """Stage 1: the corpus's documents cut by split_document for every tokenizer, written as
    out/windows/shard-*.jsonl and out/manifest.json by extras/corpus.py. Under torchrun rank 0
    builds them while the other ranks wait, then every rank reads the manifest."""
    from extras import corpus as reader
    try:
        return reader.build_windows(corpus, [target_dir, *source_dirs], out, split_document,
                                    seq_len, shard_windows, text_field, txt_docs, quiet)
    except reader.CorpusError as e:
        raise DataError(str(e)) from None


def load_manifest(out) -> dict:
    from extras import format_error, storage
    with format_error.raised_as(DataError):    # checked there: missing, damaged, another corpus's
        return storage.read_manifest(Path(out) / "manifest.json")


def shard_sizes(manifest: dict) -> list[int]:
    """Windows per shard: shard_windows each, the remainder in the last."""
    n, per = manifest["windows"], manifest["shard_windows"]
    return [min(per, n - s * per) for s in range(manifest["shards"])]


# --------------------------------------------------------------------------------------------------
# 2. Source distributions


def compute_dists(out, model_dir, name, topk=10, batch_size=8, device="auto", logprob_bits=8,
                  quiet=False, sample=0):
    """Stage 2: out/models/<name>/shard-*.npz: at each of a window's tokens (the model's own) the
    top-K next-token ids and log-probs (sample=N: N ids drawn from the model's whole distribution,
    each weighing 1/N, unbiased: window_topk); per window the CE and a checksum of the tokens."""
    from extras import ranks, storage
    from model import load
    m = load_manifest(out)
    d = Path(out) / "models" / name
    device = common.device(device)
    todo, prog = ranks.my_shards(d, shard_sizes(m), f"dists {name}", quiet)  # this rank's, to do
    info = dict(model=str(model_dir), topk=sample or topk, sample=sample, logprob_bits=logprob_bits)
    if conflict := storage.info_conflict(d, info):  # a K or bits it cannot store, or made otherwise
        raise DataError(conflict)
    if not todo:
        if not quiet:
            print(f"[dists {name}] all shards done")
        return d
    model, tok = load(model_dir, device=device, dtype=common.dtype_for(device))
    storage.write_info(d, info, tok)          # out/models/<name>/info.json, by rank 0
    if not quiet:                             # the shards to do, and the disk they take at most
        print(f"[dists {name}] {storage.dists_plan(m, len(todo), device, info)}")
    for s in todo:
        windows = storage.read_windows(out, s)
        done = []                       # per window: its tokens, top-K ids and log-probs, its CE
        for b in range(0, len(windows), batch_size):
            batch = [tok.encode(w["text"]) for w in windows[b:b + batch_size]]
            done += zip(batch, *window_topk(model, tok, batch, topk, device, sample=sample,
                                            seed=name))
            prog.update(len(batch), sum(len(t) for t in batch))
        storage.save_dists(d / f"shard-{s:05d}.npz", done, tok.vocab_size, logprob_bits)
    prog.update(0, force=True)
    return d


def window_topk(model, tok, batch: list[list[int]], topk: int, device, head_elements: int = 0,
                head_cols: int = 0, sample: int = 0, seed: str = ""):
    """One forward pass over a batch of token lists (BOS prepended when the tokenizer has one,
    right-padded). For each list of n tokens: (n, K) top-K ids and log-probs at each token
    (predicting the next one), and the CE: mean -log p of every text token given what precedes it.
    The output head runs in blocks of positions x vocabulary (extras/fast_head.py, block shape
    head_elements x head_cols, 0: the device's default), never building (N, V), so memory stays
    bounded and the stored numbers do not depend on the batch; `head_topk` below is the same
    computation written whole, and tests prove them equal. sample=N: instead of the top-K, N ids
    drawn from p, each of log-prob -log N (Random Sampling KD, Anshumann et al. 2025: unbiased)."""
    import torch
    bos = [tok.bos_id] if tok.bos_id is not None else []
    seqs = [bos + t for t in batch]
    x = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True)
    V = tok.vocab_size
    with torch.no_grad():
        h = model.hidden(x.to(device))                               # (B, T) -> (B, T, C)
        # the real positions, row after row, and the token each predicts (-1: the last, none)
        h = torch.cat([h[r, :len(s)] for r, s in enumerate(seqs)])          # (N, C)
        nxt = torch.tensor([t for s in seqs for t in s[1:] + [-1]], device=h.device)   # (N,)
        from extras.fast_head import head_topk as blocked              # = head_topk, in blocks
        from extras.sampled_labels import uniforms    # (N, sample), seeded by seed and the tokens
        top_ids, top_lp, label_lp = blocked(model, h, nxt, topk, V, head_elements, head_cols,
                                            uniforms(seqs, sample, seed))     # None: top-K
    out_ids, out_lp, out_ce, at = [], [], [], 0
    for s in seqs:                      # its rows: at .. at+len(s); the text tokens' after BOS's
        out_ids.append(top_ids[at + len(bos):at + len(s)].cpu().numpy())
        out_lp.append(top_lp[at + len(bos):at + len(s)].cpu().numpy())
        nll = -label_lp[at:at + len(s) - 1]                   # positions 0..len-2 predict 1..len-1
        out_ce.append(float(nll.mean()) if len(nll) else float("nan"))
        at += len(s)
    return out_ids, out_lp, out_ce


def head_topk(model, h, nxt, k: int, V: int):
    """The output head, the readable way: the whole logits at once, normalised over the
    tokenizer's V ids (a checkpoint may have spare rows beyond them), their top-K, and the next
    token's log-prob (its term of the CE). h (N, C): final hidden states; nxt (N,): the next token
    at each position (-1: none). Returns top-K ids and log-probs (N, K) and the next token's
    log-prob (N,) (0 where nxt is -1). extras/fast_head.py computes the same in blocks."""
    import torch
    logp = torch.log_softmax(model.logits(h, slice(0, V)), dim=-1)          # (N, V)
    top = logp.topk(k, dim=-1)                                               # (N, K)
    label = logp.gather(1, nxt.clamp(min=0)[:, None])[:, 0] * (nxt >= 0)     # (N,)
    return top.indices, top.values, label


def model_info(out, name):
    from extras import format_error, storage
    with format_error.raised_as(DataError):    # checked there: missing or damaged
        return storage.read_info(Path(out) / "models" / name / "info.json", name)


# --------------------------------------------------------------------------------------------------
# 3. Alignment onto the target
#
# A source carries 0 (the position falls back to a one-hot) to K entries onto each target token (K:
# the source's stored top-K; merging ids that land on one target id only lowers the count), so its
# aligned distributions are stored as padded rows, one per target token:
#     counts    (n,)    entries carried onto each target token, e.g.   [2, 0, 1]
#     ids       (n, K)  the entries in target ids first, then 0:       [[a, b], [0, 0], [c, 0]]
#     logprobs  (n, K)  their log-probs, then 0 (padding)
# Row i's entries are its first counts[i]: the mask np.arange(K) < counts[:, None]. `padded` writes
# it from align.transfer's result; fusellm.collate reads it by slicing (cost: extras/storage.py).


def padded(tr: align.Transferred, K: int) -> dict:
    """align.transfer's distributions (token j's entries: tr.ids[tr.offsets[j]:tr.offsets[j+1]])
    as padded rows: counts (n,), ids (n, K) and logprobs (n, K), padding 0."""
    counts = np.diff(tr.offsets)                                   # (n,) e.g. [2, 0, 1]
    row = np.repeat(np.arange(len(counts)), counts)                # each entry's token: [0, 0, 2]
    rank = np.arange(len(row)) - tr.offsets[row]                   # its place there:  [0, 1, 0]
    ids = np.zeros((len(counts), K), dtype=np.int64)               # (n, K)
    logprobs = np.zeros((len(counts), K), dtype=np.float32)        # (n, K)
    ids[row, rank] = tr.ids
    logprobs[row, rank] = tr.logprobs
    return {"counts": counts, "ids": ids, "logprobs": logprobs}


def align_source(out, name, preset="nanofuse", vocab_map=None, target="target",
                 quiet=False) -> dict:
    """Stage 3: out/aligned/<name>/shard-*.npz: per window, per target token, the source's
    distribution in target ids (`padded` rows, log-probs in uint8; fp16 when sampled), its CE, and
    out/aligned/<name>/diagnostics.json. preset: one of align.PRESETS; vocab_map: replaces the
    preset's (the resolved settings are stored in out/aligned/<name>/settings.json)."""
    from extras import emitted_tokens, ranks, storage
    from extras.align_stats import (merged_diagnostics, save_shard_stats, shard_without_stats,
                                    window_stats)
    from extras.fast_align import PairCosts
    from tokenizer import load_tokenizer
    try:
        settings = align.alignment_settings(preset, vocab_map)
    except ValueError as e:
        raise DataError(str(e)) from None
    ranks.barrier()                # every rank's distributions are written before any aligns
    m = load_manifest(out)
    src_info, tgt_info = model_info(out, name), model_info(out, target)
    s_tok, t_tok = load_tokenizer(src_info["model"]), load_tokenizer(tgt_info["model"])
    for info, tok, who in ((src_info, s_tok, name), (tgt_info, t_tok, target)):
        if changed := storage.changed_tokenizer(tok, info, who):
            raise DataError(changed)
    d = Path(out) / "aligned" / name
    if old := storage.ragged_shards(d, name) or shard_without_stats(d):    # by an older version
        raise DataError(old)
    if conflict := storage.settings_conflict(d, settings):    # else stored in d/settings.json
        raise DataError(conflict)
    sv, tv = align.normalized_vocab(s_tok), align.normalized_vocab(t_tok)
    vmap = ranks.first_rank_then_all(      # built once, on rank 0; the others read the cache
        lambda: align.vocab_map(s_tok, t_tok, settings["vocab_map"], Path(out) / "cache",
                                settings["map_ties"]))
    labels = emitted_tokens.context_labels(s_tok, t_tok, vmap, settings)  # None: the map alone
    costs = PairCosts()
    todo, prog = ranks.my_shards(d, shard_sizes(m), f"align {name}", quiet)  # this rank's, to do
    for s in todo:
        src, tgt = storage.read_dists(out, name, s), storage.read_dists(out, target, s)
        entries, stats = [], []
        for w, win in enumerate(storage.read_windows(out, s)):
            s_ids, t_ids = s_tok.encode(win["text"]), t_tok.encode(win["text"])
            for ids_, dist, who in ((s_ids, src, name), (t_ids, tgt, target)):
                if changed := storage.changed_tokens(ids_, dist, w, s, who):
                    raise DataError(changed)
            topk_ids, topk_logprobs = storage.window_rows(src, w)                 # (n, K) each
            tr = align_window(s_ids, t_ids, topk_ids, topk_logprobs, vmap, sv, tv, costs, settings,
                              labels)
            entries.append(padded(tr, src_info["topk"]))
            stats.append(window_stats(tr, s_ids, t_ids, topk_ids, topk_logprobs, vmap, sv, tv,
                                      labels))
            prog.update(1, len(t_ids))
        save_shard_stats(d, s, stats)           # first: the shard's own file marks it done
        storage.save_aligned(d / f"shard-{s:05d}.npz", entries, t_tok.vocab_size, src["ce"],
                             tgt["offsets"])
    prog.update(0, force=True)
    ranks.barrier()                # every shard's statistics are written: rank 0 merges them
    return merged_diagnostics(out, name, quiet)


def align_window(s_ids, t_ids, topk_ids, topk_logprobs, vmap, src_vocab, tgt_vocab, costs,
                 settings: dict, labels=None) -> align.Transferred:
    """One window through align.carry (alignment, matched positions, transfer) by the settings of a
    settings.json and its labels (context_labels): for align_source and train.py --online."""
    return align.carry(s_ids, t_ids, topk_ids, topk_logprobs, vmap, src_vocab, tgt_vocab,
                       positions=settings["positions"], vocab_kind=settings["vocab_map"],
                       ties=settings["ties"], fallback=settings["fallback"],
                       merge=settings["merge"], costs=costs, labels=labels)


# --------------------------------------------------------------------------------------------------
# Reading fusion-ready data


def ce_per_byte(ce: float, n_tokens: int, has_bos: bool, n_bytes: int) -> float:
    """A window's CE in nats per byte of its text: the mean per token times the number of
    predictions (every token after BOS, or all but the first without one), over the bytes. Unlike
    the mean per token, this is comparable between models whose tokenizers cut the same text into
    different numbers of tokens."""
    return float(ce) * (n_tokens if has_bos else n_tokens - 1) / max(n_bytes, 1)


class FusionData:
    """Per window: the target's tokens (re-encoded with `tokenizer`, checked against the stored
    checksum), its own top-K, and every source's aligned rows in target ids (`padded`), with
    every candidate's CE. Sources are the folders under out/aligned/ unless named. Data made for
    another target tokenizer is refused. shard(s) is read_shard(s), the last `cache_shards` kept."""

    def __init__(self, out, tokenizer=None, target="target", sources=None, cache_shards=32):
        from extras import storage
        self.out, self.target, self.tok = Path(out), target, tokenizer
        self.manifest = load_manifest(out)
        if other := storage.other_target(self.out, self.manifest, tokenizer):   # by fingerprint
            raise DataError(other)
        self.sources = sources if sources is not None else sorted(
            p.name for p in (self.out / "aligned").glob("*") if p.is_dir())
        for name in self.sources:                     # aligned by an older version: realign
            if old := storage.ragged_shards(self.out / "aligned" / name, name):
                raise DataError(old)
        self.has_bos = {n: model_info(self.out, n).get("bos") is not None
                        for n in [target, *self.sources]}
        self.shard = functools.lru_cache(maxsize=cache_shards)(self.read_shard)

    def read_shard(self, s: int) -> list[dict]:
        from extras import format_error, storage
        with format_error.raised_as(DataError):     # missing, damaged or swapped: named there
            texts = storage.read_windows(self.out, s, shard_sizes(self.manifest)[s])
            tgt = storage.read_dists(self.out, self.target, s, len(texts))     # one per window
            srcs = {n: storage.read_aligned(self.out, n, s, tgt) for n in self.sources}
        windows = []                                                   # srcs: `padded` rows
        for w, win in enumerate(texts):
            n_bytes = len(win["text"].encode("utf-8"))
            topk_ids, topk_logprobs = storage.window_rows(tgt, w)                 # (n, K) each
            target_ce = ce_per_byte(tgt["ce"][w], len(topk_ids), self.has_bos[self.target], n_bytes)
            item = {"text": win["text"],
                    "target": {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
                               "ce": float(tgt["ce"][w]), "ce_per_byte": target_ce},
                    "sources": {}}
            if self.tok is not None:
                item["tokens"] = self.tok.encode(win["text"])
                if changed := storage.changed_tokens(item["tokens"], tgt, w, s, self.target):
                    raise DataError(f"{self.out}: {changed}")
            for name, z in srcs.items():
                # window w's rows, `padded` (counts (n,), ids, logprobs (n, K)), the source's CE
                src, n_src = storage.aligned_window(z, tgt["offsets"], w)   # n_src: its tokens
                src["ce_per_byte"] = ce_per_byte(src["ce"], n_src, self.has_bos[name], n_bytes)
                item["sources"][name] = src
            windows.append(item)
        return windows


if __name__ == "__main__":
    from extras.data_cli import main       # the flags and the stages in order
    main()
