"""
extras/emitted_tokens.py: which token a tokenizer really emits for a text.

Why it exists: two of align.py's choices ask the target's own encoder what it writes. The next-token
vocab map (vocab_map_next, here) sends a source token to the first token the target emits for its
text, and every vocab map breaks ties between target ids of one string in favour of the id the
encoder emits (a sentencepiece vocabulary with byte fallback has both '<0x65>' and 'e' for "e", and
its encoder only ever writes 'e'). align.py states the idea; the mechanics (encoding a text as a
continuation of other text, and telling when that fails) are here. So is nanofuse's context rule
for labels: the vocab map is context-free, but where a source token ends in whitespace the target's
cut depends on what follows (GPT-NeoX writes "    def" as '    ' 'def', Llama-2 as '▁▁▁' '▁def').

What it holds: `continuation` (the tokens of a text where it continues other text),
`preference_order` (every id, the emitted ones first among ids of one string), `vocab_map_next`
(align.vocab_map's "next" kind, nanofuse's default), and the context rule: CONTEXTS,
`context_labels` (the labeller a preset's "context" setting names), `following_text` (the text it
reads) and `ContextLabels` (the rule).
"""
from __future__ import annotations

import codecs

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


# --------------------------------------------------------------------------------------------------
# The context rule (align.transfer's `labels`; the nanofuse preset's setting "context")

# The values of an alignment's "context" setting (none: the map alone), the text the rule reads
# after the source's next token: "whitespace-token" (nanofuse's default) the rest of the whitespace
# run and the whole source token that ends it; "whitespace-run" (the default of 2026-12-06's second
# session) the run and the first character after it; "next-char" (the default before) one character.
# The older two are kept so that folders aligned with them still train --online as they were.
CONTEXTS = ("whitespace-token", "whitespace-run", "next-char")
RUN_TOKENS = 64     # how many tokens after the source's next token the rule reads at most
CACHE_ENTRIES = 2**20   # labels kept (by candidate and text); a long --online run starts again


def context_labels(src_tok, tgt_tok, vmap, settings: dict) -> ContextLabels | None:
    """The labeller an alignment's settings name (align.PRESETS, settings.json): ContextLabels for a
    "context" setting, None (the vocab map alone) where there is none. An unknown value is a
    ValueError naming the choices."""
    context = settings.get("context")
    if context is None:
        return None
    if context not in CONTEXTS:
        raise ValueError(f"alignment setting context={context!r}; choose one of {CONTEXTS}")
    return ContextLabels(src_tok, tgt_tok, vmap, context)


def following_text(tok, ids, context: str = "whitespace-token") -> str | None:
    """The text the tokens `ids` begin with, as much as `context` reads (CONTEXTS): the whitespace
    it begins with and the whole token that ends it ("whitespace-token"), or the first character
    after that whitespace ("whitespace-run"); all of the text where it is whitespace only. Or its
    first character ("next-char"). None where there is no text, or where it begins inside a
    character (a byte-level token can end mid-character; a text read to such an end stops before
    that character)."""
    decode, text = codecs.getincrementaldecoder("utf-8")().decode, ""
    try:
        for t in ids:
            text += decode(tok.token_bytes(int(t)))
            if text.lstrip() if context != "next-char" else text:
                break
    except UnicodeDecodeError:                    # the bytes begin inside a character
        return None
    if not text:
        return None
    if context == "next-char":
        return text[0]
    return text[:len(text) - len(text.lstrip()) + 1] if context == "whitespace-run" else text


class ContextLabels:
    """Labels in context for the top-K a source predicts at a matched position (align.transfer's
    `labels`; docs/data-and-alignment.md "Labels in context").

    The vocab map labels a candidate c by how the target cuts text(c) alone. Where text(c) ends in
    whitespace the target may cut it otherwise in context, since sentencepiece glues a space to the
    word after it: where GPT-NeoX predicts '    ' (its token for 4 spaces) before "def", Llama-2's
    next token is '▁▁▁' ("    def" is '▁▁▁' '▁def'), not the map's '▁▁▁▁' (4 spaces alone).

    The rule: such a candidate's label is the first token the target emits for text(c) followed by
    the text that really comes after the source's next token (`following_text`: by default the
    rest of the whitespace run there and the whole source token that ends it), where that token
    spells text(c) but for whitespace at its end (`continuation`, cached by (c, text)). Every other
    candidate, and any where this fails (no text after, a text that does not decode), keeps the
    map's label. The target's true next token is never read.

    Why the whole run: how a target cuts whitespace depends on all of it. Where the source's next
    token is 16 spaces and more follow, one character asks how the target cuts 17 spaces (the toy
    demo's target: 8 + 9), while the real run of 18 or more starts with its 16. Why the whole token
    after it: so does what follows the run. Mistral v1 writes 8 spaces and "-" as 7 spaces and
    '▁-', but 8 spaces and "----------" as 8 spaces and '----------'. Why only whitespace: the same
    text given to every candidate re-cuts words ('rr' before 'o' becomes 'r' 'ro' where the target
    writes 'rr') and lowers the oracle label mass on real pairs (docs/data-and-alignment.md)."""

    def __init__(self, src_tok, tgt_tok, vmap: np.ndarray, context: str = "whitespace-token"):
        self.src, self.tgt, self.vmap, self.context = src_tok, tgt_tok, vmap, context
        self.spaced = np.array([src_tok.token_bytes(i)[-1:].isspace()       # (V_src,) bool
                                for i in range(src_tok.vocab_size)])
        self.cache: dict[tuple[int, str], int] = {}

    def __call__(self, src_ids, i: int, cand) -> np.ndarray:
        """(K,) target ids for the (K,) source ids `cand` predicted at source position i of src_ids
        (so after token i, before token i+1; the text read starts after token i+1)."""
        cand = np.asarray(cand)
        out = self.vmap[cand]                                 # (K,) the map's labels (a copy)
        spaced = np.flatnonzero(self.spaced[cand])            # the candidates ending in whitespace
        if not len(spaced):
            return out
        # one character takes at most 4 tokens (its 4 bytes); a whitespace run, up to RUN_TOKENS
        after = src_ids[i + 2:i + 2 + (4 if self.context == "next-char" else RUN_TOKENS)]
        text = following_text(self.src, after, self.context)
        if text is None:
            return out
        for k in spaced.tolist():
            out[k] = self.label(int(cand[k]), text)
        return out

    def label(self, c: int, after: str) -> int:
        """Candidate c's label where the text `after` follows its text (the class docstring)."""
        if (c, after) not in self.cache:
            if len(self.cache) >= CACHE_ENTRIES:                   # bounded memory, whatever the run
                self.cache.clear()
            b, label = self.src.token_bytes(c), int(self.vmap[c])
            try:
                ids = continuation(self.tgt, b.decode("utf-8") + after)
            except UnicodeDecodeError:
                ids = None
            if ids:
                first = self.tgt.token_bytes(ids[0])
                rest = b[len(first):]
                if first and b.startswith(first) and (not rest or rest.isspace()):
                    label = ids[0]
            self.cache[c, after] = label
        return self.cache[c, after]
