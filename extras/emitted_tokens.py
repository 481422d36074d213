"""
extras/emitted_tokens.py: which token a tokenizer really emits for a text.

Why it exists: two of align.py's choices ask the target's own encoder what it writes. The next-token
vocab map (vocab_map_next, here) sends a source token to the first token the target emits for its
text, and every vocab map breaks ties between target ids of one string in favour of the id the
encoder emits (a sentencepiece vocabulary with byte fallback has both '<0x65>' and 'e' for "e", and
its encoder only ever writes 'e'). align.py states the idea; the mechanics (encoding a text as a
continuation of other text, and telling when that fails) are here.

What it holds: `continuation` (the tokens of a text where it continues other text),
`preference_order` (every id, the emitted ones first among ids of one string) and `vocab_map_next`
(align.vocab_map's "next" kind, nanofuse's default).
"""
from __future__ import annotations

import numpy as np

ANCHOR = "\n"       # what continuation() puts before a text so that it is encoded as a continuation


def continuation(tok, text: str) -> list[int] | None:
    """The tokens a tokenizer gives `text` where the text continues other text: encode ANCHOR + text
    and keep the tokens after the anchor. A newline is a boundary tokenizers keep: sentencepiece
    puts its dummy prefix '▁' before the newline, not before the text, and byte-level
    pre-tokenizers split there. None when the tokens after the anchor do not spell exactly the text
    (a token joins the newline to the text, or the tokenizer normalised the text)."""
    ids = tok.encode(ANCHOR + text)
    want, got = text.encode("utf-8"), b""
    for k in range(len(ids) - 1, -1, -1):
        got = tok.token_bytes(ids[k]) + got
        if got == want:
            return ids[k:]
        if not want.endswith(got):
            return None
    return None


def preference_order(tok, vocab: list[str]) -> np.ndarray:
    """Every id of a (target) tokenizer, preferred ids first. Where several ids share one normalized
    string, the id the encoder emits for that text (continuation(text) == [id]) comes first;
    otherwise lower ids first. Every vocab map breaks its ties by this order. vocab: the
    tokenizer's normalized strings (align.normalized_vocab)."""
    groups: dict[str, list[int]] = {}
    for j, t in enumerate(vocab):
        if t:
            groups.setdefault(t, []).append(j)
    rank = np.zeros(len(vocab), dtype=np.int64)
    for ids in groups.values():
        if len(ids) < 2:
            continue
        for j in ids:
            try:
                emitted = continuation(tok, tok.token_bytes(j).decode("utf-8")) == [j]
            except UnicodeDecodeError:                 # a lone byte: no text to encode
                emitted = False
            rank[j] = 0 if emitted else 1
    return np.lexsort((np.arange(len(vocab)), rank))


def vocab_map_next(src_tok, tgt_tok, order=None) -> np.ndarray:
    """Next-token map (ours): source id -> the first token the target's encoder emits for the source
    token's text as a continuation (`continuation`). A source predicting '▁python' teaches a
    target that writes '▁py|thon' its '▁py': the token the target must produce next, not the
    nearest string ('ython', MinED). Where the encoder cannot be asked (a partial UTF-8 character,
    a text the target normalises), the longest target token whose bytes begin the source token's
    bytes, the first in `order` among equal bytes. Tokens with no bytes map to nothing (-1)."""
    by_bytes: dict[bytes, int] = {}
    for j in (range(tgt_tok.vocab_size) if order is None else np.asarray(order).tolist()):
        b = tgt_tok.token_bytes(j)
        if b:
            by_bytes.setdefault(b, int(j))
    longest = max(map(len, by_bytes))
    out = np.full(src_tok.vocab_size, -1, dtype=np.int64)
    for i in range(src_tok.vocab_size):
        b = src_tok.token_bytes(i)
        if not b:
            continue
        try:
            ids = continuation(tgt_tok, b.decode("utf-8"))
        except UnicodeDecodeError:
            ids = None
        if ids:
            out[i] = ids[0]
            continue
        for n in range(min(len(b), longest), 0, -1):
            if b[:n] in by_bytes:
                out[i] = by_bytes[b[:n]]
                break
    return out
