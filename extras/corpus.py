"""
extras/corpus.py: reading a real corpus, and writing its windows to disk.

Why it exists: real corpora are messy. A folder of .txt and .jsonl files has empty documents, lines
that are not JSON or lack the text field, stray bytes that are not UTF-8, and now and then a binary
file; a real user needs each skipped and counted (or, for a binary file, named in one error) rather
than a crash hours in. The windows then go to disk in shards of a fixed size, under a temporary
folder that is renamed only once the corpus is read through, so a killed run leaves nothing
half-written. A learner reads data.py's stage 1 (split_document: cutting a document into windows
every tokenizer fits); this is its input and output.

What it holds: `read_corpus` (with `CorpusStats`, what it skipped, and `CorpusError`),
`build_windows` (the windows stage around data.split_document: `build_once`, run by rank 0 first
under torchrun) and `write_windows` (the shards, the manifest and the summary line).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from extras.atomic_files import atomic_path, write_bytes, write_json


class CorpusStats(Counter):
    """documents, empty, invalid_utf8 (documents with bytes replaced), bad_lines (jsonl lines
    unreadable)."""


class CorpusError(ValueError):
    """A corpus that cannot be read; data.py raises it on as its DataError (this module does not
    import data.py, which imports it)."""


def read_corpus(path, text_field: str = "text", txt_docs: str = "file",
                stats: CorpusStats | None = None):
    """Yield documents from a .txt file, a .jsonl file, or a folder of them (sorted, recursive).
    txt_docs="file": a .txt file is one document; "blocks": documents are separated by blank lines.
    Empty documents, invalid UTF-8 and unreadable jsonl lines are counted in `stats` (and skipped,
    or, for stray invalid bytes, replaced by U+FFFD); a .txt file that is mostly not UTF-8, or is
    UTF-16 (a byte-order mark, or NUL bytes in more than 1% of it), is an error."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    if not path.exists():
        raise CorpusError(f"{path}: corpus not found")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")         # files: a folder may be named a.txt
                       if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise CorpusError(f"{path}: no .txt or .jsonl files in this folder")
    else:
        files = [path]
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
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                            RecursionError):            # (arrays nested thousands deep)
                        stats["bad_lines"] += 1
                        if len(stats.setdefault("bad_line_examples", [])) < 5:
                            stats["bad_line_examples"].append(f"{f}:{n}")
                        continue
                    yield from _count_doc(doc, stats)
        elif f.suffix == ".txt" or not path.is_dir():
            raw = f.read_bytes()
            nuls = raw.count(0)     # many: binary, or UTF-16 (whose ASCII decodes as UTF-8)
            if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or nuls > max(8, 0.01 * len(raw)):
                raise CorpusError(f"{f}: not UTF-8 text ({nuls} NUL bytes in {len(raw)}: a binary "
                                  f"file, or text in UTF-16); convert it to UTF-8 or remove it "
                                  f"from the corpus")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                bad = text.count("\ufffd")
                # binary, not text with a stray byte
                if bad > max(8, 0.01 * len(text)):
                    raise CorpusError(f"{f}: not UTF-8 text ({bad} invalid sequences in "
                                       f"{len(raw)} bytes); convert it to UTF-8 or remove it from "
                                       f"the corpus") from None
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


def build_windows(corpus, model_dirs, out, split, seq_len: int, shard_windows: int,
                  text_field: str, txt_docs: str, quiet: bool) -> dict:
    """data.build_windows: `build_once` on rank 0 alone under torchrun, then on the other ranks,
    which find the windows built (and say nothing). Returns the manifest."""
    from extras import ranks
    quiet = quiet or ranks.rank_world()[0] != 0      # the other ranks find them built: quiet
    return ranks.first_rank_then_all(lambda: build_once(
        corpus, model_dirs, out, split, seq_len, shard_windows, text_field, txt_docs, quiet))


def build_once(corpus, model_dirs, out, split, seq_len: int, shard_windows: int,
               text_field: str, txt_docs: str, quiet: bool) -> dict:
    """Every document of the corpus cut by split(doc, tokenizers, seq_len) for the tokenizers of
    model_dirs (target first), written by `write_windows`. A complete earlier run's manifest is
    returned as it is. Returns the manifest."""
    from extras.storage import read_manifest, tokenizer_fingerprint
    from tokenizer import load_tokenizer
    path = Path(out) / "manifest.json"
    if path.is_file():
        m = read_manifest(path)                        # checked: a damaged one is named
        if m.get("complete"):
            if not quiet:
                print(f"[windows] {out}: already built ({m['windows']} windows in "
                      f"{m['shards']} shards)")
            return m
    toks = [load_tokenizer(p) for p in model_dirs]
    stats = CorpusStats()
    meta = {"corpus": str(corpus), "target": str(model_dirs[0]),
            "sources": [str(s) for s in model_dirs[1:]], "seq_len": seq_len,
            "documents_split": 0, "target_tokenizer": tokenizer_fingerprint(toks[0])}

    def windows():                      # every document's windows, in order
        for d, doc in enumerate(read_corpus(corpus, text_field, txt_docs, stats)):
            pieces = split(doc, toks, seq_len)
            meta["documents_split"] += len(pieces) > 1
            for k, text in enumerate(pieces):
                if not text.strip():
                    continue
                for t, where in zip(toks, model_dirs):
                    if not t.encode(text):
                        raise CorpusError(
                            f"the tokenizer of {where} yields no tokens for window {k} of document "
                            f"{d} ({text[:60]!r}); it cannot encode this corpus: check that the "
                            f"tokenizer files belong to the model")
                yield {"doc": d, "part": k, "text": text}
    return write_windows(out, windows(), shard_windows, stats, meta, quiet)


def write_windows(out, windows, shard_windows: int, stats: CorpusStats, meta: dict,
                  quiet: bool) -> dict:
    """out/windows/shard-*.jsonl, shard_windows windows per file, from `windows`, an iterable of
    window dicts (which reads the corpus and counts into `stats` as it goes), then
    out/manifest.json: meta (its documents_split counted by `windows` too), the counts, and the
    corpus statistics. windows/ appears only once the
    corpus is read through (a killed run leaves no half folder behind). Returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards, n_windows, buf = 0, 0, []
    t0 = time.time()
    with atomic_path(out / "windows", folder=True) as tmp_dir:

        def flush():
            nonlocal n_shards, buf
            if buf:
                lines = "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in buf)
                write_bytes(tmp_dir / f"shard-{n_shards:05d}.jsonl", lines.encode())
                n_shards += 1
                buf = []

        for window in windows:
            buf.append(window)
            n_windows += 1
            if len(buf) == shard_windows:
                flush()
            if not quiet and time.time() - t0 > 5:
                print(f"[windows] {stats['documents']} documents, {n_windows} windows", flush=True)
                t0 = time.time()
        flush()
        if n_windows == 0:
            raise CorpusError(f"{meta['corpus']}: the corpus has no documents with text "
                               f"({dict(stats)}); nothing to do")
    # manifest.json keys in the order they always had: four of meta, the counts, the rest
    first = {k: meta[k] for k in ("corpus", "target", "sources", "seq_len")}
    rest = {k: v for k, v in meta.items() if k not in first}
    m = {"complete": True, **first, "shard_windows": shard_windows, "shards": n_shards,
         "windows": n_windows, **rest, "corpus_stats": {k: v for k, v in stats.items()}}
    write_json(out / "manifest.json", m)
    if not quiet:
        s = m["corpus_stats"]
        print(f"[windows] {s.get('documents', 0)} documents -> {n_windows} windows in {n_shards} "
              f"shards ({m['documents_split']} documents split); skipped: {s.get('empty', 0)} "
              f"empty, {s.get('bad_lines', 0)} unreadable lines {s.get('bad_line_examples', [])}; "
              f"{s.get('invalid_utf8', 0)} with invalid UTF-8 replaced")
    return m

