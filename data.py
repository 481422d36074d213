"""
data.py: from a corpus to fusion-ready data.

    python data.py windows --corpus CORPUS --target TARGET --sources A B --data DATA
    python data.py dists   --data DATA --model TARGET --name target     # and once per source
    python data.py align   --data DATA --name A                         # a source onto the target
    python data.py all     --corpus CORPUS --target TARGET --sources A B --data DATA

1. windows: read the corpus (.txt, .jsonl, or a folder of them) and cut documents into text windows that
   every tokenizer involved turns into at most seq_len tokens (BOS included), so all models see the same
   text. Windows are grouped into shards of a fixed size: the shard count does not depend on how many
   processes run later.
2. dists: run one model over every window (batched, bf16 on GPU, fp32 on CPU) and keep, at each of its
   tokens, the top-K next-token ids with log-probs normalised over its whole vocabulary, plus the window's
   cross-entropy (CE).
3. align: carry a source's top-K onto the target's tokens and vocabulary (align.py) and write diagnostics.

Every shard is written under a temporary name and renamed, and a rerun skips finished shards, so a kill
loses at most the shard in progress.

Under torchrun (`torchrun --nproc_per_node N data.py all ...`) each rank takes every N-th shard of dists and
align; what all ranks share is built by rank 0 alone while the others wait (common.first_rank_then_all): the
windows, each vocab map, and the diagnostics, merged from every shard's statistics once all ranks are done.
No rank reads, deletes or rewrites what another is writing, and the outputs are byte for byte those of one
process (for the same floating-point results: the same device and thread count).

Adding a source later runs dists + align for that source only.

Storage (per model, per token): top-K ids in the narrowest unsigned type the vocabulary allows
(uint16 up to 65536 ids), log-probs quantised to uint8 in steps of 1/16 nat (or fp16 with
--logprob-bits 16), no padding: windows are concatenated and indexed by offsets; each shard is a
deflate-compressed .npz. The model's own token ids are not stored: they are re-encoded from the window
text and checked against a stored checksum.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
import zipfile
import zlib
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

import align
import common
from common import Progress, atomic_path, write_bytes, write_json

LOGPROB_STEP = 16          # uint8 log-prob code q means log p = -q / 16 (codes saturate at 255: p < 1.2e-7)


class DataError(ValueError):
    """Bad corpus, bad data folder, or a stage run out of order; the message says which and what to do."""


# ----------------------------------------------------------------------------------------------------
# Small helpers: shards on disk, quantisation


def save_npz(path: Path, **arrays):
    """Like np.savez_compressed, but deterministic (fixed timestamps: the same arrays give the same bytes)
    and atomic (common.atomic_path). np.load reads it."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def quantize_logprobs(lp: np.ndarray, bits: int) -> np.ndarray:
    if bits == 16:
        return np.maximum(lp, -65000).astype(np.float16)
    return np.clip(np.round(-lp * LOGPROB_STEP), 0, 255).astype(np.uint8)


def dequantize_logprobs(q: np.ndarray) -> np.ndarray:
    if q.dtype == np.float16:
        return q.astype(np.float32)
    return -q.astype(np.float32) / LOGPROB_STEP


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def token_checksum(ids) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())


def tokenizer_fingerprint(tok) -> str:
    """Identifies a tokenizer by what it does: its kind, size and every token's bytes."""
    h = hashlib.sha256(f"{tok.kind}:{tok.vocab_size}:{tok.bos_id}:{tok.eos_id}".encode())
    for i in range(tok.vocab_size):
        h.update(len(tok.token_bytes(i)).to_bytes(2, "little") + tok.token_bytes(i))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# 1. Corpus -> windows


class CorpusStats(Counter):
    """documents, empty, invalid_utf8 (documents with bytes replaced), bad_lines (jsonl lines unreadable)."""


def read_corpus(path, text_field: str = "text", txt_docs: str = "file", stats: CorpusStats | None = None):
    """Yield documents from a .txt file, a .jsonl file, or a folder of them (sorted, recursive).
    txt_docs="file": a .txt file is one document; "blocks": documents are separated by blank lines.
    Empty documents, invalid UTF-8 and unreadable jsonl lines are counted in `stats` (and skipped, or, for
    stray invalid bytes, replaced by U+FFFD); a file that is mostly not UTF-8 is an error."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    if not path.exists():
        raise DataError(f"{path}: corpus not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise DataError(f"{path}: no .txt or .jsonl files in this folder")
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for n, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    try:
                        doc = json.loads(raw.decode("utf-8"))[text_field]
                        if not isinstance(doc, str):
                            raise TypeError
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                        stats["bad_lines"] += 1
                        if len(stats.setdefault("bad_line_examples", [])) < 5:
                            stats["bad_line_examples"].append(f"{f}:{n}")
                        continue
                    yield from _count_doc(doc, stats)
        elif f.suffix == ".txt" or not path.is_dir():
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                bad = text.count("\ufffd")
                if b"\x00" in raw or bad > max(8, 0.01 * len(text)):    # binary, not text with a stray byte
                    raise DataError(f"{f}: not UTF-8 text ({bad} invalid sequences in {len(raw)} bytes); "
                                    f"convert it to UTF-8 or remove it from the corpus") from None
                stats["invalid_utf8"] += 1
            docs = [text] if txt_docs == "file" else [b for b in text.split("\n\n")]
            for doc in docs:
                yield from _count_doc(doc, stats)


def _count_doc(doc: str, stats):
    if not doc.strip():
        stats["empty"] += 1
        return
    stats["documents"] += 1
    yield doc


def fits(text: str, tokenizers, seq_len: int) -> int:
    """The largest overflow (tokens beyond seq_len, BOS counted) over the tokenizers; <= 0 means it fits."""
    return max(len(t.encode(text)) + (t.bos_id is not None) - seq_len for t in tokenizers)


def split_document(doc: str, tokenizers, seq_len: int) -> list[str]:
    """Cut a document into consecutive windows (their concatenation is the document) that every tokenizer
    encodes into at most seq_len tokens, BOS included. The cut is estimated from each tokenizer's
    characters per token on this document, moved back to just after a newline or space in the window's
    second half when there is one, then checked exactly and shrunk until it fits."""
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
                raise DataError(f"a single character {doc[pos]!r} needs more than seq_len={seq_len} tokens")
            end = pos + max(1, int((end - pos) * (1 - over / seq_len) * 0.95))
        windows.append(doc[pos:end])
        pos = end
    return windows


def build_windows(corpus, target_dir, source_dirs, out, seq_len=2048, shard_windows=256, text_field="text",
                  txt_docs="file", quiet=False) -> dict:
    """Stage 1: write out/windows/shard-*.jsonl and out/manifest.json (under torchrun: rank 0 writes them while
    the other ranks wait, then every rank reads the manifest)."""
    quiet = quiet or common.rank_world()[0] != 0      # the other ranks find them built: nothing to say
    return common.first_rank_then_all(lambda: _build_windows(corpus, target_dir, source_dirs, out, seq_len,
                                                             shard_windows, text_field, txt_docs, quiet))


def _build_windows(corpus, target_dir, source_dirs, out, seq_len, shard_windows, text_field, txt_docs, quiet):
    from tokenizer import load_tokenizer
    out = Path(out)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if m.get("complete"):
            if not quiet:
                print(f"[windows] {out}: already built ({m['windows']} windows in {m['shards']} shards)")
            return m
    toks = [load_tokenizer(p) for p in [target_dir, *source_dirs]]
    out.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    n_shards, n_windows, n_split, buf = 0, 0, 0, []
    t0 = time.time()
    # windows/ appears only once the corpus is read through (a killed run leaves no half folder behind)
    with atomic_path(out / "windows", folder=True) as tmp_dir:

        def flush():
            nonlocal n_shards, buf
            if buf:
                write_bytes(tmp_dir / f"shard-{n_shards:05d}.jsonl",
                            "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in buf).encode())
                n_shards += 1
                buf = []

        for d, doc in enumerate(read_corpus(corpus, text_field, txt_docs, stats)):
            pieces = split_document(doc, toks, seq_len)
            n_split += len(pieces) > 1
            for k, text in enumerate(pieces):
                if not text.strip():
                    continue
                for t, where in zip(toks, [target_dir, *source_dirs]):
                    if not t.encode(text):
                        raise DataError(f"the tokenizer of {where} yields no tokens for window {k} of document {d} "
                                        f"({text[:60]!r}); it cannot encode this corpus: check that the tokenizer "
                                        f"files belong to the model")
                buf.append({"doc": d, "part": k, "text": text})
                n_windows += 1
                if len(buf) == shard_windows:
                    flush()
            if not quiet and time.time() - t0 > 5:
                print(f"[windows] {stats['documents']} documents, {n_windows} windows", flush=True)
                t0 = time.time()
        flush()
        if n_windows == 0:
            raise DataError(f"{corpus}: the corpus has no documents with text ({dict(stats)}); nothing to do")
    m = {"complete": True, "corpus": str(corpus), "target": str(target_dir), "sources": [str(s) for s in source_dirs],
         "seq_len": seq_len, "shard_windows": shard_windows, "shards": n_shards, "windows": n_windows,
         "documents_split": n_split, "target_tokenizer": tokenizer_fingerprint(toks[0]),
         "corpus_stats": {k: v for k, v in stats.items()}}
    write_json(manifest_path, m)
    if not quiet:
        s = m["corpus_stats"]
        print(f"[windows] {s.get('documents', 0)} documents -> {n_windows} windows in {n_shards} shards "
              f"({n_split} documents split); skipped: {s.get('empty', 0)} empty, {s.get('bad_lines', 0)} unreadable "
              f"lines {s.get('bad_line_examples', [])}; {s.get('invalid_utf8', 0)} with invalid UTF-8 replaced")
    return m


def load_manifest(out) -> dict:
    p = Path(out) / "manifest.json"
    if not p.is_file():
        raise DataError(f"{p}: not found; run `python data.py windows` (or `all`) first")
    return json.loads(p.read_text())


def shard_sizes(manifest: dict) -> list[int]:
    """Windows per shard: shard_windows each, the remainder in the last."""
    n, per = manifest["windows"], manifest["shard_windows"]
    return [min(per, n - s * per) for s in range(manifest["shards"])]


def read_windows(out, shard: int) -> list[dict]:
    p = Path(out) / "windows" / f"shard-{shard:05d}.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def my_shards(n_shards: int) -> list[int]:
    """This process's shards: every world_size-th, starting at its rank (torchrun sets RANK and WORLD_SIZE)."""
    rank, world = common.rank_world()
    return list(range(rank, n_shards, world))


def rank_label(what: str) -> str:
    """A progress label, with the rank when several processes print."""
    rank, world = common.rank_world()
    return f"{what} rank {rank}/{world}" if world > 1 else what


# ----------------------------------------------------------------------------------------------------
# 2. Source distributions


def compute_dists(out, model_dir, name, topk=10, batch_size=8, device="auto", logprob_bits=8, quiet=False):
    """Stage 2: out/models/<name>/shard-*.npz with, per token of each window (the model's own tokens), the
    top-K next-token ids and log-probs, and per window the CE and a checksum of the tokens."""
    import fusellm
    if logprob_bits not in (8, 16):
        raise DataError(f"--logprob-bits {logprob_bits}: choose 8 or 16")
    if not 1 <= topk <= 255:
        raise DataError(f"--topk {topk}: choose 1 to 255 (aligned distributions store their sizes as uint8)")
    m = load_manifest(out)
    d = Path(out) / "models" / name
    device = common.device(device)
    shards = my_shards(m["shards"])
    todo = [s for s in shards if not (d / f"shard-{s:05d}.npz").is_file()]
    info = {"model": str(model_dir), "topk": topk, "logprob_bits": logprob_bits}
    if (d / "info.json").is_file():
        old = json.loads((d / "info.json").read_text())
        if {k: old.get(k) for k in info} != info:
            raise DataError(f"{d}: already holds distributions made with {old}; use another --name or delete it")
    if not todo:
        if not quiet:
            print(f"[dists {name}] all {len(shards)} shards done")
        return d
    model, tok = fusellm.load(model_dir, device=device, dtype=common.dtype_for(device))
    d.mkdir(parents=True, exist_ok=True)
    info.update(vocab_size=tok.vocab_size, tokenizer=tokenizer_fingerprint(tok), bos=tok.bos_id)
    if not (d / "info.json").is_file() and common.rank_world()[0] == 0:
        write_json(d / "info.json", info)
    V = tok.vocab_size
    per_token = topk * (np.dtype(id_dtype(V)).itemsize + logprob_bits // 8)
    est_tokens = m["windows"] * m["seq_len"] * len(todo) / m["shards"]
    if not quiet:
        print(f"[dists {name}] {len(todo)} of {len(shards)} shards to do on {device}; expected disk at most "
              f"{est_tokens * per_token / 2**20:,.1f} MiB ({per_token} bytes/token before compression, "
              f"<= {est_tokens:,.0f} tokens)")
    prog = Progress(rank_label(f"dists {name}"), sum(shard_sizes(m)[s] for s in todo), quiet=quiet)
    for s in todo:
        windows = read_windows(out, s)
        offsets, ids_all, lp_all, ce, crc = [0], [], [], [], []
        for b in range(0, len(windows), batch_size):
            batch = [tok.encode(w["text"]) for w in windows[b:b + batch_size]]
            ids, lps, ces = window_topk(model, tok, batch, topk, device)
            for t, i_, l_, c_ in zip(batch, ids, lps, ces):
                offsets.append(offsets[-1] + len(t))
                ids_all.append(i_.astype(id_dtype(V)))
                lp_all.append(quantize_logprobs(l_, logprob_bits))
                ce.append(c_)
                crc.append(token_checksum(t))
            prog.update(len(batch), sum(len(t) for t in batch))
        save_npz(d / f"shard-{s:05d}.npz", offsets=np.array(offsets, dtype=np.int64),
                 topk_ids=np.concatenate(ids_all), topk_logprobs=np.concatenate(lp_all),
                 ce=np.array(ce, dtype=np.float32), checksum=np.array(crc, dtype=np.uint32))
    prog.update(0, force=True)
    return d


def window_topk(model, tok, batch: list[list[int]], topk: int, device, head_elements: int = 0,
                head_cols: int = 0):
    """One forward pass over a batch of token lists (BOS prepended when the tokenizer has one, right-padded).
    For each list of n tokens: (n, K) top-K ids and log-probs at each token (predicting the next one), and
    the CE: mean -log p of every text token given what precedes it. The output head runs on a block of
    positions x vocabulary at a time (head_topk), so no (B, T, V) tensor is ever built."""
    import torch
    bos = [tok.bos_id] if tok.bos_id is not None else []
    seqs = [bos + t for t in batch]
    T = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        h = model.hidden(x.to(device))                                           # (B, T, C)
        # the real positions, row after row, and the token each predicts (-1: the last, nothing to predict)
        h = torch.cat([h[r, :len(s)] for r, s in enumerate(seqs)])              # (N, C)
        nxt = torch.tensor([t for s in seqs for t in s[1:] + [-1]], device=h.device)   # (N,)
        top_ids, top_lp, label_lp = head_topk(model, h, nxt, topk, tok.vocab_size, head_elements, head_cols)
    out_ids, out_lp, out_ce, at = [], [], [], 0
    for s in seqs:
        nb = len(bos)
        n = len(s) - nb                                       # text tokens
        out_ids.append(top_ids[at + nb:at + nb + n].cpu().numpy())
        out_lp.append(top_lp[at + nb:at + nb + n].cpu().numpy())
        nll = -label_lp[at:at + len(s) - 1]                   # positions 0..len-2 predict tokens 1..len-1
        out_ce.append(float(nll.mean()) if len(nll) else float("nan"))
        at += len(s)
    return out_ids, out_lp, out_ce


def head_topk(model, h, nxt, k: int, V: int, head_elements: int = 0, head_cols: int = 0):
    """The output head in blocks of positions x vocabulary, never the whole (N, V) logits: for a slice of `rows`
    positions, walk the vocabulary `cols` entries at a time -> logits (rows, cols) -> fold them into a running
    log-sum-exp (logaddexp), a running top-K (the block's top-K merged with the best so far) and the next
    token's logit when it falls in this block -> the next block. Peak memory is one block of head_elements
    floats whatever N and V: Gemma 3's 262,144-token vocabulary over 8 windows of 2048 tokens would be 17 GB
    at once.
    Block shape (0: by device). On CPU, 2^21 floats (8 MiB: 512 positions x 4096 entries), so a block stays
    in cache for the exp and top-K passes that follow the matrix product: on Gemma 3 270M and 2 cores that
    is 1.4x faster than whole-vocabulary rows (README, bench.py dists). On GPU, where each block costs kernel
    launches, 2^26 floats (256 MiB) and the whole vocabulary per block. nxt (N,): the next token at each
    position (-1: none).
    Returns top-K ids and log-probs (N, K) and the next token's log-prob (N,) (0 where nxt is -1)."""
    import torch
    cols = min(V, head_cols or (V if h.is_cuda else 4096))
    rows = max(1, (head_elements or (2**26 if h.is_cuda else 2**21)) // cols)
    ids, lps, label = [], [], []
    for i in range(0, len(h), rows):
        hs, t = h[i:i + rows], nxt[i:i + rows]                                 # (r, C), (r,)
        lse = torch.full((len(hs),), -float("inf"), device=h.device)           # (r,) running log-sum-exp
        top_v = torch.empty(len(hs), 0, device=h.device)                       # (r, <=K) running top-K logits
        top_i = torch.empty(len(hs), 0, dtype=torch.long, device=h.device)     # (r, <=K) and their ids
        lab = torch.zeros(len(hs), device=h.device)                            # (r,) the next token's logit
        for c in range(0, V, cols):
            z = model.logits(hs, slice(c, min(c + cols, V)))                  # (r, cols) fp32
            bv, bi = z.topk(min(k, z.shape[1]), dim=-1)                        # (r, k): bv[:, 0] is the block's max
            here = (t >= c) & (t < c + z.shape[1])                             # the next token is in this block
            lab = torch.where(here, z.gather(1, (t - c).clamp(0, z.shape[1] - 1)[:, None])[:, 0], lab)
            # the block's log-sum-exp, max + log sum exp(z - max), with z overwritten in place (one pass less
            # and no second (r, cols) tensor), folded into the running one
            lse = torch.logaddexp(lse, bv[:, 0] + z.sub_(bv[:, :1]).exp_().sum(-1).log())
            top_v, j = torch.cat([top_v, bv], 1).topk(min(k, top_v.shape[1] + bv.shape[1]), dim=-1)
            top_i = torch.cat([top_i, bi + c], 1).gather(1, j)
        ids.append(top_i)
        lps.append(top_v - lse[:, None])                                       # log-probs over the whole vocabulary
        label.append((lab - lse) * (t >= 0))
    return torch.cat(ids), torch.cat(lps), torch.cat(label)


def read_dists(out, name, shard):
    z = np.load(Path(out) / "models" / name / f"shard-{shard:05d}.npz")
    return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------------
# 3. Alignment onto the target


# The alignment settings: ours by default, the paper's and the official code's as options (README, "Alignment").
ALIGN_DEFAULTS = {"positions": "exact", "vocab_map": "next", "map_ties": "emitted", "ties": "closest",
                  "fallback": "next", "merge": "sum"}
ALIGN_OFFICIAL = {"positions": "paper", "vocab_map": "mined", "map_ties": "lowest", "ties": "official",
                  "fallback": "official", "merge": "first"}


def align_settings(**given) -> dict:
    """ALIGN_DEFAULTS with the given settings (None: the default), each checked against its choices."""
    choices = {"positions": align.POSITIONS, "vocab_map": align.VOCAB_MAPS, "map_ties": align.MAP_TIES,
               "ties": align.TIES, "fallback": align.FALLBACKS, "merge": align.MERGES}
    settings = dict(ALIGN_DEFAULTS)
    for k, v in given.items():
        if k not in choices:
            raise DataError(f"unknown alignment setting {k!r}; the settings are {sorted(choices)}")
        if v is not None:
            if v not in choices[k]:
                raise DataError(f"alignment setting {k}={v!r}; choose one of {choices[k]}")
            settings[k] = v
    return settings


def align_source(out, name, target="target", quiet=False, **settings) -> dict:
    """Stage 3: out/aligned/<name>/shard-*.npz: per window, per target token, the source's distribution
    in target ids (counts, ids, uint8 log-probs; count 0 = fall back to the one-hot on the label), the
    source's CE, and out/aligned/<name>/diagnostics.json. settings: positions, vocab_map, ties, fallback,
    merge (align_settings; stored in out/aligned/<name>/settings.json)."""
    from tokenizer import load_tokenizer
    settings = align_settings(**settings)
    common.barrier()                            # every rank's distributions are written before any rank aligns
    rank = common.rank_world()[0]
    m = load_manifest(out)
    src_info = model_info(out, name)
    tgt_info = model_info(out, target)
    s_tok, t_tok = load_tokenizer(src_info["model"]), load_tokenizer(tgt_info["model"])
    for info, tok, who in ((src_info, s_tok, name), (tgt_info, t_tok, target)):
        if tokenizer_fingerprint(tok) != info["tokenizer"]:
            raise DataError(f"the tokenizer of {info['model']} changed since `dists --name {who}` ran; rerun it")
    d = Path(out) / "aligned" / name
    d.mkdir(parents=True, exist_ok=True)
    if (d / "settings.json").is_file() and json.loads((d / "settings.json").read_text()) != settings:
        raise DataError(f"{d} was aligned with other settings ({(d / 'settings.json').read_text()}); delete it first")
    if rank == 0 and not (d / "settings.json").is_file():
        write_json(d / "settings.json", settings)
    sv, tv = align.normalized_vocab(s_tok), align.normalized_vocab(t_tok)
    # built once, on rank 0; the other ranks then read it from the cache
    vmap = common.first_rank_then_all(
        lambda: align.vocab_map(s_tok, t_tok, settings["vocab_map"], Path(out) / "cache", settings["map_ties"]))
    costs = align.PairCosts()
    shards = my_shards(m["shards"])
    todo = [s for s in shards if not (d / f"shard-{s:05d}.npz").is_file()]
    prog = Progress(rank_label(f"align {name}"), sum(shard_sizes(m)[s] for s in todo), quiet=quiet)
    T_dtype = id_dtype(t_tok.vocab_size)
    for s in todo:
        windows, src, tgt = read_windows(out, s), read_dists(out, name, s), read_dists(out, target, s)
        counts, ids, lps, stats = [], [], [], []
        for w, win in enumerate(windows):
            s_ids, t_ids = s_tok.encode(win["text"]), t_tok.encode(win["text"])
            for ids_, dist, who in ((s_ids, src, name), (t_ids, tgt, target)):
                if token_checksum(ids_) != dist["checksum"][w]:
                    raise DataError(f"window {w} of shard {s}: {who}'s tokens differ from those its distributions "
                                    f"were computed on; rerun `dists --name {who}`")
            a, b = src["offsets"][w], src["offsets"][w + 1]
            tr = align_window(s_ids, t_ids, src["topk_ids"][a:b].astype(np.int64),
                              dequantize_logprobs(src["topk_logprobs"][a:b]), vmap, sv, tv, costs, settings)
            counts.append(np.diff(tr.offsets).astype(np.uint8))
            ids.append(tr.ids.astype(T_dtype))
            lps.append(quantize_logprobs(tr.logprobs, 8))
            stats.append(tr.stats)
            prog.update(1, len(t_ids))
        tc = np.concatenate(counts)
        save_npz(d / f"shard-{s:05d}.npz", counts=tc, ids=np.concatenate(ids), logprobs=np.concatenate(lps),
                 ce=src["ce"], target_offsets=tgt["offsets"])
        _save_shard_stats(d, s, stats)
    prog.update(0, force=True)
    common.barrier()                            # every shard's statistics are written: rank 0 merges them

    def merged():
        diag = diagnostics(out, name) if rank == 0 else json.loads((d / "diagnostics.json").read_text())
        if rank == 0 and not quiet:
            print_diagnostics(name, diag)
        return diag
    return common.first_rank_then_all(merged)


def stored_align_settings(out, name) -> dict:
    """The settings `align` used for a source (out/aligned/<name>/settings.json), or the defaults."""
    p = Path(out) / "aligned" / name / "settings.json"
    if not p.is_file():
        return dict(ALIGN_DEFAULTS)
    stored = json.loads(p.read_text())
    if "positions" not in stored:                # aligned before these settings existed: the paper's rule and
        stored.update(positions="paper", map_ties="lowest")     # lowest-id ties
    stored.setdefault("map_ties", "emitted")     # aligned with exact positions before the tie rule was a setting
    return align_settings(**stored)


def align_window(s_ids, t_ids, topk_ids, topk_logprobs, vmap, src_vocab, tgt_vocab, costs, settings) -> align.Transferred:
    """One window through align.carry: alignment, matched positions, transfer. settings: align_settings()."""
    return align.carry(s_ids, t_ids, topk_ids, topk_logprobs, vmap, src_vocab, tgt_vocab,
                       positions=settings["positions"], vocab_kind=settings["vocab_map"], ties=settings["ties"],
                       fallback=settings["fallback"], merge=settings["merge"], costs=costs)


def model_info(out, name):
    p = Path(out) / "models" / name / "info.json"
    if not p.is_file():
        raise DataError(f"{p}: not found; run `python data.py dists --name {name} --model MODEL` first")
    return json.loads(p.read_text())


STAT_KEYS = ("positions", "matched", "fallback", "kept_mass", "lost_mass", "scored", "label_mass", "oracle_mass")


def _save_shard_stats(d: Path, shard: int, stats: list[dict]):
    unmatched = Counter()
    for st in stats:
        unmatched.update(st["unmatched"])
    agg = {k: float(sum(st[k] for st in stats)) for k in STAT_KEYS}
    agg["unmatched"] = [[s, t, n] for (s, t), n in unmatched.most_common(200)]
    write_json(d / f"stats-{shard:05d}.json", agg)


def diagnostics(out, name) -> dict:
    """Per source: the share of target positions that take the source's distribution ("aligned_1to1", the
    matched share), the share that fell back, the top-K probability mass lost in the vocab map, the label
    quality at matched positions (align.transfer: "label_mass", the mean probability the renormalised carried
    distribution puts on the target's true next token; "oracle_label_mass", the share of positions where an
    oracle source's true next token lands on the target's true next token, 1.0 for a perfect transfer),
    and the most frequent unmatched token pairs."""
    d = Path(out) / "aligned" / name
    tot = Counter()
    unmatched = Counter()
    for f in sorted(d.glob("stats-*.json")):
        st = json.loads(f.read_text())
        for k in STAT_KEYS:
            tot[k] += st[k]
        for s, t, n in st["unmatched"]:
            unmatched[(s, t)] += n
    mass = tot["kept_mass"] + tot["lost_mass"]
    diag = {"source": name, "positions": int(tot["positions"]),
            "aligned_1to1": tot["matched"] / max(tot["positions"], 1),
            "fallback": tot["fallback"] / max(tot["positions"], 1),
            "topk_mass_lost_in_vocab_map": tot["lost_mass"] / mass if mass else 0.0,
            "label_mass": tot["label_mass"] / max(tot["scored"], 1),
            "oracle_label_mass": tot["oracle_mass"] / max(tot["scored"], 1),
            "most_frequent_unmatched": [{"source": s, "target": t, "count": n} for (s, t), n in unmatched.most_common(20)]}
    write_json(d / "diagnostics.json", diag)
    return diag


def print_diagnostics(name, diag):
    print(f"[align {name}] {diag['positions']} target positions: {diag['aligned_1to1']:.1%} carry the source's "
          f"distribution, {diag['fallback']:.1%} fell back; {diag['topk_mass_lost_in_vocab_map']:.2%} of the top-K mass lost "
          f"in the vocab map; label quality: oracle {diag['oracle_label_mass']:.3f}, this source's labels put "
          f"{diag['label_mass']:.3f} on the target's next token")
    for u in diag["most_frequent_unmatched"][:8]:
        print(f"    {u['count']:6d}  source {u['source']!r:24} target {u['target']!r}")


# ----------------------------------------------------------------------------------------------------
# Reading fusion-ready data


def ce_per_byte(ce: float, n_tokens: int, has_bos: bool, n_bytes: int) -> float:
    """A window's CE in nats per byte of its text: the mean per token times the number of predictions (every
    token after BOS, or all but the first without one), over the bytes. Unlike the mean per token, this is
    comparable between models whose tokenizers cut the same text into different numbers of tokens."""
    return float(ce) * (n_tokens if has_bos else n_tokens - 1) / max(n_bytes, 1)


class FusionData:
    """Per window: the target's tokens (re-encoded with `tokenizer`, checked against the stored checksum), its
    own top-K, and every source's aligned top-K in target ids, with every candidate's CE. Sources are the
    folders under out/aligned/ unless named. Data made for another target tokenizer is refused. The last
    `cache_shards` shards read stay in memory."""

    def __init__(self, out, tokenizer=None, target="target", sources=None, cache_shards=32):
        self.out, self.target, self.tok = Path(out), target, tokenizer
        self.manifest = load_manifest(out)
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest["target_tokenizer"]:
            raise DataError(f"{self.out} was made for another target tokenizer (fingerprint "
                            f"{self.manifest['target_tokenizer']}, this one {tokenizer_fingerprint(tokenizer)}); "
                            f"run data.py for this target")
        self.sources = sources if sources is not None else sorted(p.name for p in (self.out / "aligned").glob("*")
                                                                  if p.is_dir())
        self.has_bos = {n: model_info(self.out, n).get("bos") is not None for n in [target, *self.sources]}
        self._cache, self.cache_shards = OrderedDict(), cache_shards

    def shard(self, s: int) -> list[dict]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        tgt = read_dists(self.out, self.target, s)
        srcs = {n: dict(np.load(self.out / "aligned" / n / f"shard-{s:05d}.npz")) for n in self.sources}
        src_offsets = {n: np.load(self.out / "models" / n / f"shard-{s:05d}.npz")["offsets"] for n in self.sources}
        starts = {n: np.concatenate([[0], np.cumsum(z["counts"], dtype=np.int64)]) for n, z in srcs.items()}
        windows = []
        for w, win in enumerate(read_windows(self.out, s)):
            a, b = tgt["offsets"][w], tgt["offsets"][w + 1]
            n_bytes = len(win["text"].encode("utf-8"))
            item = {"text": win["text"],
                    "target": {"topk_ids": tgt["topk_ids"][a:b].astype(np.int64),
                               "topk_logprobs": dequantize_logprobs(tgt["topk_logprobs"][a:b]),
                               "ce": float(tgt["ce"][w]),
                               "ce_per_byte": ce_per_byte(tgt["ce"][w], b - a, self.has_bos[self.target], n_bytes)},
                    "sources": {}}
            if self.tok is not None:
                item["tokens"] = self.tok.encode(win["text"])
                if token_checksum(item["tokens"]) != tgt["checksum"][w]:
                    raise DataError(f"{self.out}: window {w} of shard {s} tokenises differently than when its "
                                    f"distributions were made; rerun data.py")
            for n, z in srcs.items():
                counts = z["counts"][a:b]
                start, end = int(starts[n][a]), int(starts[n][b])
                n_src = int(src_offsets[n][w + 1] - src_offsets[n][w])
                item["sources"][n] = {"counts": counts, "ids": z["ids"][start:end].astype(np.int64),
                                      "logprobs": dequantize_logprobs(z["logprobs"][start:end]), "ce": float(z["ce"][w]),
                                      "ce_per_byte": ce_per_byte(z["ce"][w], n_src, self.has_bos[n], n_bytes)}
            windows.append(item)
        self._cache[s] = windows
        if len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)                 # the least recently used
        return windows


def label_mass(data_dir, fusion: str = "mince") -> dict:
    """On a data.py folder (real sources of a run): the mean probability each candidate's renormalised top-K
    puts on the target's true next token where it carries a distribution, the share of positions it carries,
    and the same mass for the fused P_t (fusellm.fuse) over every position training fuses."""
    import torch
    import fusellm
    from tokenizer import load_tokenizer
    tok = load_tokenizer(model_info(data_dir, "target")["model"])
    fd = FusionData(data_dir, tokenizer=tok)
    names, K = ["target"] + fd.sources, model_info(data_dir, "target")["topk"]
    sums, carried, fused_sum, n = np.zeros(len(names)), np.zeros(len(names)), 0.0, 0
    for s, size in enumerate(shard_sizes(load_manifest(data_dir))):
        b = fusellm.collate(fd.shard(s)[:size], names, tok.bos_id, K)
        mask, labels = b.fusion_mask, b.labels
        p = torch.softmax(b.cand_logprobs, dim=-1).nan_to_num(0.0)                      # (C, B, T, K)
        on_label = (p * (b.cand_ids == labels[None, ..., None])).sum(-1)                # (C, B, T)
        carries = ~b.cand_fallback & mask                                               # (C, B, T)
        ids, probs = fusellm.fuse(b, fusion)
        fused_sum += float(((probs * (ids == labels[..., None])).sum(-1) * mask).sum())
        sums += (on_label * carries).sum(dim=(1, 2)).numpy()
        carried += carries.sum(dim=(1, 2)).numpy()
        n += int(mask.sum())
    out = {f"candidate: {name}": {"mass on the true next token": sums[c] / max(carried[c], 1),
                                  "share of positions carried": carried[c] / n} for c, name in enumerate(names)}
    out[f"fused P_t ({fusion}; a fallback is the one-hot label)"] = {"mass on the true next token": fused_sum / n}
    return out


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    def shared_flags(sp):
        sp.add_argument("--data", required=True, help="the data folder (written by windows, read by every stage)")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")

    w = sub.add_parser("windows", help="corpus -> text windows every tokenizer fits in seq_len")
    d = sub.add_parser("dists", help="one model's top-K next-token distributions over every window")
    a = sub.add_parser("align", help="carry one source's distributions onto the target")
    al = sub.add_parser("all", help="windows, then dists for the target and each source, then align each source")
    for sp in (w, al):
        sp.add_argument("--corpus", required=True, help=".txt, .jsonl, or a folder of them")
        sp.add_argument("--target", required=True, help="the target model folder")
        sp.add_argument("--sources", nargs="+", default=[], help="source model folders")
        sp.add_argument("--seq-len", type=int, default=2048, help="max tokens per window for every tokenizer")
        sp.add_argument("--shard-windows", type=int, default=256, help="windows per shard")
        sp.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
        sp.add_argument("--txt-docs", choices=["file", "blocks"], default="file",
                        help="a .txt file is one document, or blank-line separated blocks are")
    for sp in (d, al):
        sp.add_argument("--topk", type=int, default=10, help="next-token entries kept per token, 1..255 (default 10)")
        sp.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
        sp.add_argument("--device", default="auto", help=common.DEVICE_HELP)
        sp.add_argument("--logprob-bits", type=int, default=8, choices=[8, 16],
                        help="stored log-probs: uint8 in steps of 1/16 nat (default) or fp16")
    d.add_argument("--model", required=True, help="the model folder to run")
    d.add_argument("--name", required=True, help="'target' for the target model, any name for a source")
    a.add_argument("--name", required=True, help="the source's name given to `dists`")
    align_flags = {   # alignment setting -> (its choices, what it decides); default None: ALIGN_DEFAULTS
        "positions": (align.POSITIONS, "which target positions take a source distribution: 'exact' (default: "
                      "tokens that end at the same byte) or 'paper' (1:1 MinED-aligned tokens that match)"),
        "vocab_map": (align.VOCAB_MAPS, "source id -> target id: 'next' (default: the token the target emits "
                      "first for the source token's text), 'mined' (paper: nearest string), 'em' (equal strings)"),
        "map_ties": (align.MAP_TIES, "vocab-map ties between target tokens of one text: 'emitted' (default: the "
                     "one the target's encoder emits) or 'lowest' (lowest id, the official code)"),
        "ties": (align.TIES, "MinED path ties (paper positions only): 'closest' (default) or 'official'"),
        "fallback": (align.FALLBACKS, "unmatched positions: one-hot on the next token (default, correct) or on "
                     "the current one (the official code's off-by-one, stored and trained on)"),
        "merge": (align.MERGES, "top-K ids mapped to one target id: add their probabilities (default) or keep "
                  "the first (official)"),
    }
    for sp in (a, al):
        for key, (choices, what) in align_flags.items():
            sp.add_argument(f"--{key.replace('_', '-')}", choices=list(choices), default=None, help=what)
        sp.add_argument("--official", action="store_true",
                        help="the official code's alignment: --positions paper --vocab-map mined --map-ties "
                             "lowest --ties official --fallback official --merge first (options given "
                             "explicitly still win)")
    for sp in (w, d, a, al):
        shared_flags(sp)
    args = p.parse_args(argv)
    try:
        if args.stage == "windows":
            build_windows(args.corpus, args.target, args.sources, args.data, args.seq_len, args.shard_windows,
                          args.text_field, args.txt_docs, args.quiet)
        elif args.stage == "dists":
            compute_dists(args.data, args.model, args.name, args.topk, args.batch_size, args.device,
                          args.logprob_bits, args.quiet)
        elif args.stage == "align":
            align_source(args.data, args.name, quiet=args.quiet, **cli_align_settings(args))
        else:
            build_windows(args.corpus, args.target, args.sources, args.data, args.seq_len, args.shard_windows,
                          args.text_field, args.txt_docs, args.quiet)
            names = ["target"] + [source_name(s) for s in args.sources]
            for model, name in zip([args.target, *args.sources], names):
                compute_dists(args.data, model, name, args.topk, args.batch_size, args.device, args.logprob_bits,
                              args.quiet)
            for name in names[1:]:
                align_source(args.data, name, quiet=args.quiet, **cli_align_settings(args))
    except ValueError as e:                 # DataError, CheckpointError, TokenizerError: one clear line
        raise SystemExit(f"error: {e}") from None


def cli_align_settings(args) -> dict:
    """The alignment settings given on the command line, over ALIGN_OFFICIAL's with --official."""
    base = dict(ALIGN_OFFICIAL) if args.official else {}
    given = {k: getattr(args, k) for k in ALIGN_DEFAULTS}          # None where not given
    return {**base, **{k: v for k, v in given.items() if v is not None}}


def source_name(path) -> str:
    return Path(path).name.replace(" ", "_") or "source"


if __name__ == "__main__":
    main()
