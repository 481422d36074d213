"""
extras/storage.py: how data.py's shards are laid out on disk, byte for byte.

Why it exists: a real corpus gives billions of (token, top-K) rows, so the stored form decides the
disk a run needs and whether a resumed or multi-process run can be trusted. The official format
takes about 120 bytes per token per model (fp16 logits, int64 ids, padded); this one about 15 at
top-10 and 8.5 at top-5 on the tests' tiny world (tools/bench.py dists measures a model), and the
same arrays always give the same bytes, so torchrun's output can be compared with one process's. A
learner needs only what data.py's docstring says about the format; these are the details. A
source's aligned distributions are stored as padded (n, K) rows with a count per token (data.py's
comment before `padded`), so a window is read back with one slice. Storing only the entries
(ragged, as before) saves 6-10%: on the demo's real data (295,419 target tokens, K=10) 12.66
instead of 13.44 bytes per token for the code source, 10.38 instead of 11.40 for the prose one;
7.7 instead of 8.5 at K=5 on the tests' tiny world.

What it holds:
- `save_npz`: np.savez_compressed, but deterministic (fixed timestamps) and atomic (written under
  a temporary name, then renamed).
- `quantize_logprobs` / `dequantize_logprobs`: log-probs as uint8 codes in steps of
  1/LOGPROB_STEP nat (or fp16); a decoded log-prob is within half a step of the model's.
- `id_dtype`: the narrowest unsigned type a vocabulary's ids fit (uint16 up to 65536 ids).
- `token_checksum` and `tokenizer_fingerprint`: a model's own tokens are not stored but re-encoded
  from the window text, so each window keeps a checksum of them, and each model folder a
  fingerprint of its tokenizer (its kind, size and every token's bytes), to catch a tokenizer that
  changed in between.
- `save_dists` and `save_aligned`: one shard of a model's distributions, of a source's aligned
  ones (data.py's padded rows), as the arrays above (aligned log-probs in fp16 when the source's
  labels are sampled: `aligned_bits`); `expected_disk` and `dists_plan`: the
  estimate compute_dists prints. `ragged_shards`: the check that refuses aligned shards in the
  ragged form of earlier versions (delete the folder and align again).
- `read_windows`, `read_dists`, `window_rows`, `read_aligned`, `aligned_window`: the shards read
  back (a window's text, a model's distributions and one window's rows of them decoded, a source's
  aligned ones and one window's entries of them decoded), for data.FusionData.
- `other_target`: the check that a data folder was made for the target tokenizer it is read with.
- `info_conflict`, `write_info`, `changed_tokenizer`, `changed_tokens`: a model folder's info.json,
  and the checks that distributions are added to it only with settings it can store, the same
  settings and the same tokenizer (and the same kind of labels as the data folder's other models:
  top-K, or --sample N with one N, `labels_kind`), and that a window still gives the tokens they
  were made on. Sampled labels (extras/sampled_labels.py) are stored as top-K ones are: N ids per
  token, in ascending order, repeats kept, every log-prob -log N.
- `read_align_settings`, `stored_align_settings`, `settings_conflict`: an aligned folder's
  settings.json (files from older versions included), and the check that a folder is aligned with
  one set of settings only (and sampled labels never with merge "first").
"""
from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

import align
from extras.atomic_files import atomic_path, write_json
from extras import ranks
from extras.format_error import FormatError

LOGPROB_STEP = 16   # uint8 log-prob code q: log p = -q / 16 (codes saturate at 255: p < 1.2e-7)


def save_npz(path: Path, **arrays):
    """Like np.savez_compressed, but deterministic (fixed timestamps: the same arrays give the same
    bytes) and atomic (extras/atomic_files.py atomic_path). np.load reads it."""
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


def save_dists(path: Path, windows, vocab_size: int, bits: int):
    """One shard of a model's distributions (data.compute_dists). windows: per window (its tokens,
    top-K ids (n, K), log-probs (n, K), CE). Stored: offsets (windows + 1,) into the concatenated
    rows, topk_ids, topk_logprobs (quantised), ce and a checksum of each window's tokens."""
    tokens, ids, logprobs, ce = zip(*windows)
    save_npz(path, offsets=np.cumsum([0] + [len(t) for t in tokens], dtype=np.int64),
             topk_ids=np.concatenate([i.astype(id_dtype(vocab_size)) for i in ids]),
             topk_logprobs=np.concatenate([quantize_logprobs(lp, bits) for lp in logprobs]),
             ce=np.array(ce, dtype=np.float32),
             checksum=np.array([token_checksum(t) for t in tokens], dtype=np.uint32))


def save_aligned(path: Path, windows, vocab_size: int, ce, target_offsets, bits: int = 0):
    """One shard of a source's aligned distributions (data.align_source). windows: per window, the
    padded rows of data.padded (counts (n,), ids (n, K), logprobs (n, K)). Stored: the windows'
    rows concatenated, counts as uint8, ids in id_dtype, log-probs as uint8 codes or fp16 (`bits`;
    0: aligned_bits of the shard's folder) (padding: 0), the source's CE per window and the
    target's offsets. read_aligned reads either width."""
    bits = bits or aligned_bits(Path(path).parent)
    save_npz(path, counts=np.concatenate([w["counts"].astype(np.uint8) for w in windows]),
             ids=np.concatenate([w["ids"].astype(id_dtype(vocab_size)) for w in windows]),
             logprobs=np.concatenate([quantize_logprobs(w["logprobs"], bits) for w in windows]),
             ce=ce, target_offsets=target_offsets)


def aligned_bits(d: Path) -> int:
    """The width of the log-probs stored in aligned folder d (out/aligned/<name>): 16 (fp16) when
    its source's labels are sampled (out/models/<name>/info.json says --sample N), else 8 (uint8
    codes; also when there is no info.json, as for a shard written outside a data folder). A
    sampled source's aligned entry is log(c/N), c of its N draws merged onto one target id, and
    uint8's 1/16-nat steps would skew the counts' ratios (counts 1 and 11 of 12 read back as
    0.080 and 0.920 instead of 0.083 and 0.917); fp16 keeps them within 0.1%. Top-K rows keep
    uint8, as the model's own stored ones do by default."""
    info = d.parent.parent / "models" / d.name / "info.json"
    return 16 if info.is_file() and read_info(info, d.name).get("sample") else 8


def ragged_shards(d: Path, name: str) -> str | None:
    """Why aligned folder d cannot be read or added to: its shards are in the ragged form of
    earlier versions (ids (sum counts,), not padded rows (n, K)). None when they are not (or it has
    none). Only the first shard's ids are read: a folder is aligned by one version."""
    shards, rerun = sorted(Path(d).glob("shard-*.npz")), f"`python data.py align --name {name}`"
    try:
        if not shards or read_arrays(shards[0], ("ids",), rerun)["ids"].ndim == 2:
            return None
    except FormatError as e:            # damaged: why it cannot be read, the same way
        return str(e)
    return (f"{d} holds aligned shards in the old ragged form; delete {d} and rerun "
            f"`python data.py align --data {Path(d).parent.parent} --name {name}`")


# what fixes damaged windows: they are rebuilt exactly from the corpus, and the stored
# distributions (hours of GPU work) are checked against them by checksum, so they can stay
REBUILD = ("delete manifest.json and windows/ and run `python data.py windows` again with the same "
           "corpus and settings")


def read_json(path: Path, missing: str, damaged: str):
    """A JSON file of a data folder; missing or not JSON: named, with what to do (`missing`,
    `damaged`)."""
    if not path.is_file():
        raise FormatError(f"{path}: not found; {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}); {damaged}") from None


def read_manifest(path: Path) -> dict:
    """A data folder's manifest.json, checked: the counts shards are read by (windows, shards,
    shard_windows, seq_len) are positive integers that agree with each other and with the shards
    in windows/, and the target tokenizer's fingerprint is there. Missing: run the windows stage;
    damaged or from another corpus: named, with what to do."""
    m = read_json(path, "run `python data.py windows` (or `all`) first", REBUILD)
    counts = ("windows", "shards", "shard_windows", "seq_len")
    if (not isinstance(m, dict) or not all(type(m.get(k)) is int and m[k] > 0 for k in counts)
            or not isinstance(m.get("target_tokenizer"), str)):
        raise FormatError(f"{path}: not a data folder's manifest (it needs {', '.join(counts)}, "
                          f"positive integers, and target_tokenizer); {REBUILD}")
    found = len(list((path.parent / "windows").glob("shard-*.jsonl")))
    if m["shards"] != -(-m["windows"] // m["shard_windows"]) or found != m["shards"]:
        raise FormatError(f"{path}: {m['windows']} windows in {m['shards']} shards of "
                          f"{m['shard_windows']}, and windows/ holds {found} shards: a manifest "
                          f"from another corpus, or damaged; {REBUILD}")
    return m


def read_info(path: Path, name: str) -> dict:
    """A model folder's info.json (write_info), checked to be an object naming the model and its
    tokenizer. Missing: run the dists stage for it."""
    rerun = f"`python data.py dists --name {name} --model MODEL`"
    info = read_json(path, f"run {rerun} first", f"delete its folder and run {rerun}")
    if not isinstance(info, dict) or not all(k in info for k in ("model", "tokenizer", "topk")):
        raise FormatError(f"{path}: not a model's info.json (model, tokenizer, topk); delete its "
                          f"folder and run {rerun}")
    return info


def read_windows(out, shard: int, expected: int | None = None) -> list[dict]:
    """Shard `shard` of the windows (out/windows/shard-*.jsonl): one {"text": ...} per window;
    `expected`: how many the manifest says it holds. Lines end at "\\n" only: a window's text may
    hold the other line ends str.splitlines knows (U+2028, NEL), which JSON leaves unescaped."""
    p = Path(out) / "windows" / f"shard-{shard:05d}.jsonl"
    if not p.is_file():
        raise FormatError(f"{p}: not found; {REBUILD}")
    try:
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{p}: damaged ({e}); {REBUILD}") from None
    if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
        raise FormatError(f"{p}: a line is not a window ({{\"text\": ...}}); {REBUILD}")
    if expected is not None and len(rows) != expected:
        raise FormatError(f"{p}: holds {len(rows)} windows where manifest.json says {expected}: "
                          f"a manifest from another corpus, or damaged windows; {REBUILD}")
    return rows


def read_arrays(path: Path, keys: tuple, rerun: str) -> dict:
    """The arrays `keys` of one .npz shard. Missing, cut or damaged (zip, zlib and numpy errors),
    or without these arrays (a shard of another kind): named, with the stage to rerun."""
    if not path.is_file():
        raise FormatError(f"{path}: not found; run {rerun} (it writes the shards missing)")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in keys if k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:
        raise FormatError(f"{path}: damaged ({type(e).__name__}: {e}); delete it and run "
                          f"{rerun}") from None
    if missing := [k for k in keys if k not in arrays]:
        raise FormatError(f"{path}: has no {', '.join(missing)}; a shard of another kind: "
                          f"delete it and run {rerun}")
    return arrays


def offsets_fit(o: np.ndarray) -> bool:
    """Whether `o` can be a shard's window offsets: integers, one dimension, from 0, never down."""
    return o.ndim == 1 and o.size >= 1 and o.dtype.kind in "iu" and o[0] == 0 and \
        bool((np.diff(o) >= 0).all())


def read_dists(out, name, shard, windows: int | None = None) -> dict:
    """Shard `shard` of model `name`'s distributions, as save_dists stored them, checked to fit
    together (and to hold `windows` windows, when given: as many as its windows shard)."""
    path = Path(out) / "models" / name / f"shard-{shard:05d}.npz"
    rerun = f"`python data.py dists --name {name}`"
    d = read_arrays(path, ("offsets", "topk_ids", "topk_logprobs", "ce", "checksum"), rerun)
    o, n = d["offsets"], d["offsets"].size - 1          # n windows: one offset more
    if (not offsets_fit(o) or d["topk_ids"].ndim != 2
            or d["topk_logprobs"].shape != d["topk_ids"].shape or o[-1] != len(d["topk_ids"])
            or d["ce"].shape != (n,) or d["checksum"].shape != (n,)):
        raise FormatError(f"{path}: its arrays do not fit together; damaged: delete it and run "
                          f"{rerun}")
    if windows is not None and n != windows:
        raise FormatError(f"{path}: holds {n} windows, its windows shard {windows}: a shard of "
                          f"another run, or swapped; delete it and run {rerun}")
    return d


def window_rows(dists: dict, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Window w's rows of a read_dists shard: top-K ids (n, K) as int64, log-probs (n, K)
    decoded."""
    a, b = dists["offsets"][w], dists["offsets"][w + 1]
    ids, logprobs = dists["topk_ids"][a:b], dists["topk_logprobs"][a:b]
    return ids.astype(np.int64), dequantize_logprobs(logprobs)


def read_aligned(out, name, shard, target: dict | None = None) -> dict:
    """Shard `shard` of source `name`'s aligned distributions, as save_aligned stored them, with
    "source_offsets" (where each window's rows start in the source's own distributions, for its CE
    per byte). Checked: its arrays fit together, it was aligned on the tokens of `target` (the
    target's read_dists shard, when given) and from its source's shard (the same CEs)."""
    path = Path(out) / "aligned" / name / f"shard-{shard:05d}.npz"
    rerun = f"`python data.py align --name {name}`"
    z = read_arrays(path, ("counts", "ids", "logprobs", "ce", "target_offsets"), rerun)
    own_path = Path(out) / "models" / name / f"shard-{shard:05d}.npz"
    own = read_arrays(own_path, ("offsets", "ce"),                # only these two arrays are read
                      f"`python data.py dists --name {name}`")
    t = z["target_offsets"]
    if (not offsets_fit(t) or z["ids"].ndim != 2 or z["logprobs"].shape != z["ids"].shape
            or z["counts"].shape != (len(z["ids"]),) or len(z["ids"]) != t[-1]
            or z["ce"].shape != (len(t) - 1,)):
        raise FormatError(f"{path}: its arrays do not fit together; damaged: delete it and run "
                          f"{rerun}")
    if (not np.array_equal(own["ce"], z["ce"], equal_nan=True) or own["offsets"].shape != t.shape
            or (target is not None and not np.array_equal(target["offsets"], t))):
        raise FormatError(f"{path}: aligned from other distributions than {own_path} and the "
                          f"target's shard {shard} (a shard of another run, or swapped); delete "
                          f"the wrong one and run its stage again ({rerun})")
    z["source_offsets"] = own["offsets"]
    return z


def aligned_window(z: dict, target_offsets, w: int) -> tuple[dict, int]:
    """Window w's rows of a read_aligned shard `z`, in data.padded's form with ids as int64 and
    log-probs decoded: {"counts" (n,), "ids" (n, K), "logprobs" (n, K), "ce": the source's CE on
    the window}, and the number of the source's own tokens in the window (for its CE per byte).
    target_offsets: where each window's target tokens start (read_dists's "offsets")."""
    a, b = target_offsets[w], target_offsets[w + 1]               # the window's target tokens
    n_src = int(z["source_offsets"][w + 1] - z["source_offsets"][w])
    return {"counts": z["counts"][a:b], "ids": z["ids"][a:b].astype(np.int64),
            "logprobs": dequantize_logprobs(z["logprobs"][a:b]),
            "ce": float(z["ce"][w])}, n_src


def other_target(out, manifest: dict, tok) -> str | None:
    """Why data folder `out` (its manifest) cannot be read with target tokenizer `tok`: it was made
    for another one (the fingerprints differ). None when it was made for it, or tok is None."""
    made_for = manifest["target_tokenizer"]
    this = made_for if tok is None else tokenizer_fingerprint(tok)
    if this == made_for:
        return None
    return (f"{out} was made for another target tokenizer (fingerprint {made_for}, this one "
            f"{this}); run data.py for this target")


def read_align_settings(path: Path) -> dict:
    """The alignment settings stored in an aligned/<name>/settings.json, in today's keys: files
    written before a setting existed get the value that was used then (no "positions": the paper's
    rule with lowest-id map ties; no "map_ties": "emitted"; no "context": the vocab map alone, as
    the "paper" and "official" presets still have it). A setting or value align.py does not know is
    a ValueError naming the file."""
    from extras.emitted_tokens import CONTEXTS
    choices = {"positions": align.POSITIONS, "vocab_map": align.VOCAB_MAPS,
               "map_ties": align.MAP_TIES, "ties": align.TIES, "fallback": align.FALLBACKS,
               "merge": align.MERGES, "context": CONTEXTS}
    stored = json.loads(Path(path).read_text())
    if "positions" not in stored:        # aligned before these settings existed: the paper's rule
        stored.update(positions="paper", map_ties="lowest")     # and lowest-id ties
    stored.setdefault("map_ties", "emitted")   # exact positions, before the tie rule was a setting
    for k, v in stored.items():
        if k not in choices or v not in choices[k]:
            raise ValueError(f"{path}: alignment setting {k}={v!r} is not one of "
                             f"{ {k: list(c) for k, c in choices.items()} }; delete the folder and "
                             f"align again")
    return stored


def stored_align_settings(out, name) -> dict:
    """The settings `align` used for a source (out/aligned/<name>/settings.json, older files read as
    they were used: read_align_settings), or the nanofuse preset's."""
    p = Path(out) / "aligned" / name / "settings.json"
    return read_align_settings(p) if p.is_file() else align.alignment_settings("nanofuse")


def expected_disk(manifest: dict, shards: int, topk: int, vocab_size: int, bits: int) -> str:
    """What `shards` shards of one model's distributions take at most, before compression."""
    per_token = topk * (np.dtype(id_dtype(vocab_size)).itemsize + bits // 8)
    tokens = manifest["windows"] * manifest["seq_len"] * shards / manifest["shards"]
    return (f"expected disk at most {tokens * per_token / 2**20:,.1f} MiB ({per_token} bytes/token "
            f"before compression, <= {tokens:,.0f} tokens)")


def dists_plan(manifest: dict, shards: int, device, info: dict) -> str:
    """What compute_dists prints before it starts: `shards` of the manifest's shards to do on
    `device`, and their expected_disk for a model folder's `info` (after write_info)."""
    disk = expected_disk(manifest, shards, info["topk"], info["vocab_size"], info["logprob_bits"])
    return f"{shards} of {manifest['shards']} shards to do on {device}; {disk}"


def labels_kind(info: dict) -> str:
    """How a model folder's info.json says its labels were made: "--sample N" or "top-K"."""
    return f"--sample {info['sample']}" if info.get("sample") else "top-K"


def folder_sample(out) -> int:
    """N when data folder `out`'s models were stored with --sample N, 0 when with their top-K or
    none is stored yet (info_conflict keeps one kind per folder; train.py --online draws the same
    N). A damaged info.json: a FormatError naming it."""
    found = {read_info(p, p.parent.name).get("sample", 0)
             for p in sorted(Path(out).glob("models/*/info.json"))}
    if len(found) > 1:
        raise FormatError(f"{Path(out) / 'models'}: its models' labels were made in different ways "
                          f"({sorted(found)}; 0: top-K), which data.py refuses; delete the ones "
                          f"that differ and run their dists again")
    return found.pop() if found else 0


def info_conflict(d: Path, info: dict) -> str | None:
    """Why a model folder cannot take distributions made with `info` (model, topk, sample,
    logprob_bits): a top-K, a number of draws or a log-prob width this storage cannot hold; its
    info.json says they were made otherwise; or another model of the same data folder was stored
    another way (top-K beside --sample N, or another N: fusellm.collate reads as many entries per
    candidate as the target stores, so a sampled source beside a top-K target would be cut, and its
    estimate biased). A folder written before --sample existed reads as sample 0. None when it
    can."""
    if info["logprob_bits"] not in (8, 16):
        return f"--logprob-bits {info['logprob_bits']}: choose 8 or 16"
    what = "--sample" if info.get("sample") else "--topk"
    if not 1 <= info["topk"] <= 255:
        return (f"{what} {info['topk']}: choose 1 to 255 (aligned distributions store their sizes "
                f"as uint8)")
    try:
        if (d / "info.json").is_file():
            old = read_info(d / "info.json", d.name)
            if {k: old.get(k, 0 if k == "sample" else None) for k in info} != info:
                return (f"{d}: already holds distributions made with {old}; use another --name "
                        f"or delete it")
        siblings = [(p, read_info(p, p.parent.name))
                    for p in sorted(d.parent.glob("*/info.json")) if p.parent != d]
    except FormatError as e:   # refused, never skipped: a damaged sibling could hide a mix
        return (f"{e} (every model's info.json in {d.parent} is read to check that they all "
                f"store their labels one way; fix it before `dists --name {d.name}`)")
    for other, theirs in siblings:
        if theirs.get("sample", 0) != info.get("sample", 0):
            return (f"{d.parent.parent}: {other.parent.name}'s distributions were made with "
                    f"{labels_kind(theirs)} and these would be {labels_kind(info)}; every model "
                    f"of a data folder is stored one way: run with {labels_kind(theirs)}, or "
                    f"use another --data folder")
    return None


def write_info(d: Path, info: dict, tok):
    """d/info.json: `info` with the tokenizer's size, fingerprint and BOS, written once (rank 0)."""
    d.mkdir(parents=True, exist_ok=True)
    info.update(vocab_size=tok.vocab_size, tokenizer=tokenizer_fingerprint(tok), bos=tok.bos_id)
    if not (d / "info.json").is_file() and ranks.rank_world()[0] == 0:
        write_json(d / "info.json", info)


def changed_tokenizer(tok, info: dict, who: str) -> str | None:
    """Why `tok` is not the tokenizer a model's distributions were made with (its info.json), or
    None."""
    if tokenizer_fingerprint(tok) == info["tokenizer"]:
        return None
    return f"the tokenizer of {info['model']} changed since `dists --name {who}` ran; rerun it"


def changed_tokens(ids, dists: dict, w: int, shard: int, who: str) -> str | None:
    """Why `ids`, window w's tokens encoded now, are not those `who`'s distributions (a read_dists
    shard) were computed on (the stored checksum differs), or None."""
    if token_checksum(ids) == dists["checksum"][w]:
        return None
    return (f"window {w} of shard {shard}: {who}'s tokens differ from those its distributions were "
            f"computed on; rerun `dists --name {who}`")


def settings_conflict(d: Path, settings: dict) -> str | None:
    """Why folder d (an aligned source) cannot take shards aligned with `settings`: its
    settings.json (read_align_settings) says it was aligned otherwise, or the source's labels are
    sampled (--sample) and merge "first" would keep one draw of an id drawn several times (its
    count lost: extras/sampled_labels.py). None when it can; the first time, rank 0 writes the
    settings there."""
    info = d.parent.parent / "models" / d.name / "info.json"
    if settings["merge"] == "first" and info.is_file() and read_info(info, d.name).get("sample"):
        return (f"{d.name}'s labels are sampled ({labels_kind(read_info(info, d.name))}): merge "
                f"'first' (the official preset) would keep one draw of an id drawn several times; "
                f"align it with --align nanofuse or paper (merge 'sum')")
    d.mkdir(parents=True, exist_ok=True)
    p = d / "settings.json"
    if p.is_file():
        if read_align_settings(p) == settings:
            return None
        return f"{d} was aligned with other settings ({p.read_text()}); delete it first"
    if ranks.rank_world()[0] == 0:
        write_json(p, settings)
    return None
