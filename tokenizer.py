"""
tokenizer.py: the tokenizers of real checkpoints, without `transformers`.

Three kinds of file, one small interface (`Tokenizer`):
- sentencepiece `tokenizer.model` (Llama-2, OpenLLaMA, Mistral) runs on the `sentencepiece` library;
- Hugging Face byte-level BPE `tokenizer.json` (GPT-2, GPT-NeoX/MPT, Llama-3, Qwen2) runs on `tiktoken`;
- Llama-3's own `tokenizer.model` (tiktoken's format: base64 token and rank per line) runs on `tiktoken`.

Why tiktoken can run a Hugging Face BPE exactly. HF BPE repeatedly applies the merge rule of lowest
index among the adjacent pairs; tiktoken repeatedly joins the adjacent pair whose *concatenation* has
the lowest rank. These agree when every token's rank is the index of the merge rules that produce it,
which requires the rules producing one token to sit next to each other in the merge list (checked
below; a file that breaks it gets an error). tiktoken returns ranks; a lookup table turns them into
the file's ids. tiktoken also tries the whole pre-token first, which is HF's `ignore_merges`.

Each token also has its bytes and its display string in the HF convention (`▁the`, `Ġthe`, `<0x0A>`),
which alignment needs. Special/control tokens of sentencepiece stand for no bytes; added tokens of a
tokenizer.json stand for their text.
"""
from __future__ import annotations

import base64
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer file that cannot be run exactly; the message names the file and the fix."""


# The GPT-2 pre-tokenizer regex that HF's ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama-3's pattern (also what its tiktoken-format tokenizer.model needs).
# StarCoder: HF's Digits(individual_digits) before the GPT-2 regex, as one regex: every numeric character
# (\p{N}, "½" too) a piece of its own, and a whitespace run before one taken whole, as the GPT-2 regex takes
# a run that ends its text (HF runs it on the text between the digits).
STARCODER_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}").replace(r"\s+(?!\S)", r"\s+(?=\p{N})|\s+(?!\S)")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the rest to
    U+0100 onwards in order (space -> 'Ġ', newline -> 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bytes_to_display(b: bytes) -> str:
    t = bytes_to_unicode()
    return "".join(t[x] for x in b)


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """encode(text) -> ids (no BOS/EOS added), decode(ids) -> text, and per token its bytes and display
    string. vocab_size counts every id, special tokens included. add_bos: whether the checkpoint's own
    tokenizer puts BOS before a text by default (what Hugging Face's encode does: Llama, Mistral and Gemma do,
    GPT-2 and Qwen2 do not); evaluation follows it unless told otherwise."""

    kind: str
    vocab_size: int
    special: set[str]      # display strings of special/control tokens
    bos_id: int | None
    eos_id: int | None
    add_bos: bool = False
    pieces: list[str]      # display string per id (HF convention)
    piece_bytes: list[bytes]  # bytes per id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return b"".join(self.piece_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        return self.pieces[i]

    def token_bytes(self, i: int) -> bytes:
        return self.piece_bytes[i]

    def __repr__(self):
        return f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} bos={self.bos_id} eos={self.eos_id}>"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, model_proto: bytes | None = None):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is not None:                 # a model built in memory (from a GGUF vocabulary)
                self.sp.load_from_serialized_proto(model_proto)
            else:
                self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}); expected a tokenizer.model "
                                 f"from a Llama-2/Mistral-style checkpoint") from None
        n = self.sp.get_piece_size()
        self.vocab_size = n
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None           # Hugging Face's LlamaTokenizer default
        self.pieces = [self.sp.id_to_piece(i) for i in range(n)]
        self.special = {p for i, p in enumerate(self.pieces) if self.sp.is_control(i)}
        self.piece_bytes = []
        for i, p in enumerate(self.pieces):
            if self.sp.is_byte(i):
                self.piece_bytes.append(bytes([int(p[3:5], 16)]))       # <0xNN>
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                self.piece_bytes.append(b"")
            else:
                self.piece_bytes.append(p.replace("\u2581", " ").encode())

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class TiktokenBPE(Tokenizer):
    """A byte-level BPE run by tiktoken. ranks: token bytes -> rank; rank_to_id maps ranks to our ids (-1: a
    byte the vocabulary has no token for: dropped, as HF drops it, or `unk_id` when the file names one);
    added: text -> id for tokens matched in the text before BPE (HF's added tokens). merges_only: the file's
    BPE has ignore_merges false, so a pre-token that is itself a token still goes through the merges (tiktoken
    takes it whole; the rare token the merges cannot reach on its own is split as HF splits it)."""

    def __init__(self, kind, name, pattern, ranks: dict[bytes, int], rank_to_id: np.ndarray,
                 added: dict[str, int], special: set[str], bos_id, eos_id, nfc=False, merges_only=False,
                 unk_id=None, fuse_unk=False, rules: dict | None = None, exact: bool = False):
        import tiktoken
        self.kind = kind
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.rank_to_id = rank_to_id
        self.added, self.special, self.nfc = added, special, nfc
        self.split = re.compile("|".join(re.escape(s) for s in sorted(added, key=len, reverse=True))) if added else None
        self.vocab_size = max([int(rank_to_id.max())] + list(added.values())) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        self.piece_bytes = [b""] * self.vocab_size
        for b, r in ranks.items():
            if rank_to_id[r] >= 0:
                self.piece_bytes[int(rank_to_id[r])] = b
        self.pieces = [bytes_to_display(b) for b in self.piece_bytes]
        for s, i in added.items():
            self.piece_bytes[i] = s.encode()
            self.pieces[i] = s
        self.unk_id, self.fuse_unk, self.has_holes = unk_id, fuse_unk, bool((rank_to_id < 0).any())
        self.merges_only, self.ranks, self.rules, self.exact = merges_only, ranks, rules, exact
        if exact:                               # the exact path: HF's own algorithm, pre-token by pre-token
            import regex
            self.pre = regex.compile(pattern)
            self._piece = lru_cache(maxsize=1 << 16)(self._piece_by_rules)
        if merges_only and not exact:           # the fast path's check of whole pre-tokens (_through_merges)
            self.rank_bytes = [b""] * len(ranks)
            for b, r in ranks.items():
                self.rank_bytes[r] = b
            self.reached = np.zeros(len(ranks), dtype=np.int8)    # 0: not checked yet, 1: merges reach it, 2: not
            self.merged = {}                                       # rank -> the ranks the merges give instead

    def encode(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        out, pos = [], 0
        for m in (self.split.finditer(text) if self.split else ()):
            out += self._bpe(text[pos:m.start()])
            out.append(self.added[m.group()])
            pos = m.end()
        return out + self._bpe(text[pos:])

    def _bpe(self, text):
        if not text:
            return []
        if self.exact:
            r = np.asarray([k for piece in self.pre.findall(text) for k in self._piece(piece.encode())], dtype=np.int64)
        else:                                   # the fast path: tiktoken
            r = np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)
            if self.merges_only:
                r = self._through_merges(r)
        ids = self.rank_to_id[r]
        if self.has_holes:                      # bytes with no token: dropped, or the unknown token
            if self.unk_id is None:
                ids = ids[ids >= 0]
            else:
                hole = ids < 0
                if self.fuse_unk:               # a run of unknown bytes is one unknown token
                    keep = ~(hole & np.concatenate([[False], hole[:-1]]))
                    ids, hole = ids[keep], hole[keep]
                ids = np.where(hole, self.unk_id, ids)
        return ids.tolist()

    def _piece_by_rules(self, piece: bytes) -> tuple[int, ...]:
        """One pre-token's ranks by HF's merge rules (the exact path): whole, when ignore_merges allows it."""
        if not self.merges_only and piece in self.ranks:
            return (self.ranks[piece],)
        return tuple(self.ranks[p] for p in bpe_by_rules(piece, self.rules))

    def _through_merges(self, r: np.ndarray) -> np.ndarray:
        """tiktoken takes a pre-token that is a whole token as that token. HF without ignore_merges runs the
        merges on it anyway, which give the same token unless some higher-priority merge inside it gets in the
        way. Such a token is never made by merges inside a longer pre-token either (the merges inside its
        span happen in the same order, or one crosses its edge), so it appears in tiktoken's output only as a
        whole pre-token: replace it by what the merges give. Each rank is checked once, when first seen."""
        for k in np.unique(r[self.reached[r] == 0]).tolist():
            parts = bpe_by_rules(self.rank_bytes[k], self.rules)
            self.reached[k] = 1 if len(parts) == 1 else 2
            if len(parts) > 1:
                self.merged[k] = [self.ranks[p] for p in parts]
        if not (self.reached[r] == 2).any():
            return r
        return np.asarray([x for k in r.tolist() for x in self.merged.get(k, (k,))], dtype=np.int64)


def bpe_by_rules(piece: bytes, rules: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """HF's BPE, the readable way: start from single bytes and repeatedly apply the merge rule (pair -> rank)
    of lowest rank among adjacent pairs, the leftmost on ties, until no rule applies."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        found = [(rules[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in rules]
        if not found:
            break
        _, i = min(found)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _load_tiktoken_file(path: Path, config: dict) -> TiktokenBPE:
    """Llama-3's tokenizer.model: 'base64(token) rank' per line; its special tokens come from code
    (Llama 3.1 names), or from tokenizer_config.json's added_tokens_decoder when the folder has one."""
    ranks = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: not a 'base64 rank' line; not a tiktoken-format tokenizer.model") from None
    n_base = len(ranks)
    if n_base != 128000:
        raise TokenizerError(f"{path}: a tiktoken-format file with {n_base} tokens; only Llama-3's (128000 tokens) "
                             f"is known, since the file carries neither its regex nor its special tokens. "
                             f"Use the checkpoint's tokenizer.json instead")
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    special = {s: n_base + i for i, s in enumerate(names)}
    decoder = config.get("added_tokens_decoder") or {}
    if decoder:
        special = {v["content"]: int(k) for k, v in decoder.items()}
    rank_to_id = np.arange(n_base, dtype=np.int64)
    if sorted(ranks.values()) != list(range(n_base)):
        raise TokenizerError(f"{path}: ranks are not 0..{n_base - 1}; not a Llama-3 tokenizer.model")
    bos = _named_id(config.get("bos_token"), special) or special.get("<|begin_of_text|>")
    eos = _named_id(config.get("eos_token"), special) or special.get("<|end_of_text|>")
    tok = TiktokenBPE("tiktoken", path.name, LLAMA3_PATTERN, ranks, rank_to_id, special, set(special), bos, eos)
    tok.add_bos = bos is not None                        # Llama-3 starts every text with <|begin_of_text|>
    return tok


def _named_id(tok, table):
    if isinstance(tok, dict):
        tok = tok.get("content")
    return table.get(tok) if tok else None


def _load_tokenizer_json(path: Path, config: dict) -> TiktokenBPE:
    """A Hugging Face tokenizer.json with a byte-level BPE model, checked to be runnable exactly."""
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return bpe_from_spec(spec, path, config)


def bpe_from_spec(spec: dict, path: Path, config: dict) -> TiktokenBPE:
    """A byte-level BPE from a tokenizer.json's content (read from the file, or rebuilt from a GGUF)."""
    bad = lambda what: TokenizerError(  # noqa: E731
        f"{path}: {what}; nanofuse runs byte-level BPE tokenizer.json files exactly (GPT-2, GPT-NeoX, "
        f"Llama-3, Qwen2 style) and sentencepiece models through tokenizer.model")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise bad(f"model type {model.get('type')!r} is not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise bad(f"BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise bad("a sentencepiece-style BPE (byte_fallback) is not byte-level")
    # normalizer: none or NFC
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Sequence" and not norm.get("normalizers"):
        norm = None
    if norm and norm.get("type") != "NFC":
        raise bad(f"normalizer {norm.get('type')!r} is not supported (only none or NFC)")
    # pre-tokenizer: ByteLevel with the GPT-2 regex, or Split(regex, Isolated) + ByteLevel(use_regex=False)
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    pattern, digits = None, False
    for s in steps:
        t = s.get("type")
        if t == "Digits" and s.get("individual_digits") and pattern is None and not digits:
            digits = True                                   # StarCoder: every numeric character alone
        elif t == "Split" and pattern is None and not digits and "Regex" in (s.get("pattern") or {}):
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise bad(f"Split behavior {s.get('behavior')!r} invert={s.get('invert')} is not supported")
            pattern = s["pattern"]["Regex"]
            if re.search(r"\{\d+(,\d*)?\}\+", pattern):
                raise bad("the Split regex uses a '{n,m}+' quantifier, which HF's regex engine reads as a "
                          "repeated repeat and tiktoken as possessive; they split digit runs differently")
        elif t == "ByteLevel":
            if s.get("add_prefix_space"):
                raise bad("ByteLevel add_prefix_space=true is not supported")
            if s.get("use_regex", True):
                if pattern is not None:
                    raise bad("two pre-tokenizer regexes")
                pattern = STARCODER_PATTERN if digits else GPT2_PATTERN
        else:
            raise bad(f"pre-tokenizer {t!r} is not supported")
    if pattern is None or not any(s.get("type") == "ByteLevel" for s in steps):
        raise bad("the pre-tokenizer is not byte-level")

    vocab: dict[str, int] = model.get("vocab") or {}
    added_specs = spec.get("added_tokens") or []
    added_text = {a["id"]: a["content"] for a in added_specs}
    to_byte = unicode_to_bytes()
    tok_bytes = {}
    for tok, i in vocab.items():
        if i in added_text:        # GPT-NeoX keeps its space-run added tokens in the vocabulary as plain text
            tok_bytes[tok] = added_text[i].encode()
            continue
        try:
            tok_bytes[tok] = bytes(to_byte[c] for c in tok)
        except KeyError:
            raise bad(f"vocabulary token {tok!r} (id {i}) is neither byte-level text nor an added token") from None
    byte_ids = {b: i for tok, i in vocab.items() if len(b := tok_bytes[tok]) == 1 and i not in added_text}
    # ranks: single bytes first, then one rank per merged token in merge order
    ranks = {b: v for v, b in enumerate(sorted(byte_ids))}
    rank_ids = [byte_ids[b] for b in sorted(byte_ids)]
    last, rules = None, {}
    for n, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        tok = a + b
        if tok not in vocab or a not in vocab or b not in vocab:
            raise bad(f"merge {n} ({a!r} {b!r}) joins or makes a token that is not in the vocabulary")
        tb = tok_bytes[tok]
        rules.setdefault((tok_bytes[a], tok_bytes[b]), n)
        if tb in ranks:
            if tok != last:
                raise bad(f"merge {n} makes {tok!r} again after other merges; its rules are not contiguous, "
                          f"so no rank order reproduces this merge order")
            continue
        ranks[tb] = len(ranks)
        rank_ids.append(vocab[tok])
        last = tok
    if model.get("ignore_merges"):
        # tokens no merge makes are still reachable as whole pre-tokens
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if tok_bytes[tok] not in ranks and i not in added_text:
                ranks[tok_bytes[tok]] = len(ranks)
                rank_ids.append(i)
    # Bytes without a token (StarCoder's vocabulary has 242 of the 256; the 14 missing never occur in UTF-8 text):
    # tiktoken needs every byte, so each gets the last ranks, which no merge uses, and id -1; HF drops such a
    # byte, or writes the unknown token when the file names one.
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = len(ranks)
            rank_ids.append(-1)
    unk_id = vocab.get(model["unk_token"]) if model.get("unk_token") else None
    # tiktoken joins any two adjacent parts whose bytes form a token; HF only the pairs its rules list. They
    # agree when every way to cut a token into two tokens is a rule. Otherwise the exact path runs HF's
    # algorithm in Python (slower, cached per pre-token).
    exact = any((t[:k], t[k:]) not in rules and t[:k] in ranks and t[k:] in ranks
                for t in ranks if len(t) > 1 for k in range(1, len(t)))
    added, special, unreachable = {}, set(), {}
    for a in added_specs:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise bad(f"added token {a['content']!r} uses lstrip/rstrip/single_word")
        added[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["content"])
    for tok, i in vocab.items():
        if tok_bytes[tok] not in ranks and i not in added.values():
            unreachable[i] = tok      # no merge makes it, but its id exists: keep its bytes for decode
    tk = TiktokenBPE("bpe", path.name, pattern, ranks, np.asarray(rank_ids, dtype=np.int64), added, special,
                     None, None, nfc=bool(norm), merges_only=not model.get("ignore_merges"), unk_id=unk_id,
                     fuse_unk=bool(model.get("fuse_unk")), rules=rules, exact=exact)
    for i, tok in unreachable.items():
        tk.piece_bytes[i], tk.pieces[i] = tok_bytes[tok], tok
    table = {**{t: i for t, i in vocab.items()}, **added}
    tk.bos_id = _named_id(config.get("bos_token"), table)
    tk.eos_id = _named_id(config.get("eos_token"), table)
    if tk.bos_id is None and "bos_token" not in config:
        tk.bos_id = next((table[s] for s in ("<|begin_of_text|>", "<s>", "<|startoftext|>") if s in table), None)
    if tk.eos_id is None and "eos_token" not in config:
        tk.eos_id = next((table[s] for s in ("<|end_of_text|>", "</s>", "<|endoftext|>") if s in table), None)
    first = template_start(spec.get("post_processor"))        # the special token HF's encode puts first, if any
    if first is not None and first in table:
        tk.add_bos = True
        tk.bos_id = tk.bos_id if tk.bos_id is not None else table[first]
    return tk


def template_start(post: dict | None) -> str | None:
    """The special token a tokenizer.json's post-processor puts before a single text (TemplateProcessing, e.g.
    "<|begin_of_text|> $A" or "<bos> $A", possibly inside a Sequence), or None (ByteLevel, none at all)."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        return next((t for t in map(template_start, post.get("processors", [])) if t is not None), None)
    if post.get("type") == "TemplateProcessing" and post.get("single"):
        head = post["single"][0]
        return head["SpecialToken"]["id"] if "SpecialToken" in head else None
    return None


def _is_sentencepiece(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        first = head.decode("ascii").split("\n", 1)[0]
    except UnicodeDecodeError:
        return True
    return not re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", first)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a model folder, or a tokenizer file given directly. In a folder, a byte-level BPE
    tokenizer.json comes first, then tokenizer.model (sentencepiece or Llama-3 tiktoken format)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            config = {}
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model; copy the checkpoint's "
                                 f"tokenizer files into the folder")
        first_error = None
        for c in found:
            try:
                return _configured(load_tokenizer_file(c, config), config)
            except TokenizerError as e:
                first_error = first_error or e
        raise first_error
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file or folder")
    return _configured(load_tokenizer_file(path, config), config)


def _configured(tok: Tokenizer, config: dict) -> Tokenizer:
    """tokenizer_config.json's add_bos_token, where it says, decides whether a text starts with BOS."""
    if isinstance(config.get("add_bos_token"), bool):
        tok.add_bos = config["add_bos_token"] and tok.bos_id is not None
    return tok


# ----------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format): the vocabulary travels inside the model file. A byte-level BPE ("gpt2" model)
# keeps its tokens, merges, token types and special ids, but not its pre-tokenizer regex: only a name
# (tokenizer.ggml.pre), which this table turns back into the regex, normalizer and ignore_merges of the
# original tokenizer.json.

_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {   # tokenizer.ggml.pre -> (regex, NFC, ignore_merges)
    "gpt-2": (GPT2_PATTERN, False, False),
    "gpt2": (GPT2_PATTERN, False, False),
    "mpt": (GPT2_PATTERN, True, False),             # GPT-NeoX-20B's tokenizer
    "gpt-neox": (GPT2_PATTERN, True, False),
    "starcoder": (STARCODER_PATTERN, False, False),
    "refact": (STARCODER_PATTERN, False, False),
    "llama-bpe": (LLAMA3_PATTERN, False, True),     # Llama-3
    "llama3": (LLAMA3_PATTERN, False, True),
    "qwen2": (_QWEN2_PATTERN, True, False),
}


def read_gguf(path) -> tuple[dict, list[dict], int]:
    """A GGUF file's header, read directly: the metadata {key: value}, the tensors' infos (name, shape in
    numpy order, ggml type, offset from the data start) and where the data starts. The layout (little-endian):
    b"GGUF", version u32, tensor count u64, metadata count u64; each metadata entry a string key, a u32 type and
    its value (strings: u64 length + UTF-8; arrays: u32 element type, u64 count, elements); each tensor a string
    name, u32 dims, u64 sizes (innermost first), u32 ggml type, u64 offset; then the data, aligned to
    general.alignment (32 by default)."""
    import mmap
    import struct
    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise TokenizerError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    numpy_of = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            elem, n = take("<I"), take("<Q")
            if elem == 8:
                return [string() for _ in range(n)]
            if elem not in numpy_of:
                raise TokenizerError(f"{path}: metadata array of type {elem} is not supported")
            arr = np.frombuffer(buf, dtype=numpy_of[elem], count=n, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        if kind not in scalar:
            raise TokenizerError(f"{path}: metadata value of type {kind} is not supported (a corrupt file?)")
        return take(scalar[kind])

    try:
        version, n_tensors, n_kv = take("<4x I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise TokenizerError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = string(), take("<I")
            dims = [take("<Q") for _ in range(n_dims)]
            tensors.append({"name": name, "shape": dims[::-1], "type": take("<I"), "offset": take("<Q")})
    except struct.error:
        raise TokenizerError(f"{path}: the GGUF header is truncated; re-download the file") from None
    align = int(fields.get("general.alignment", 32))
    return fields, tensors, (pos + align - 1) // align * align


def gguf_fields(path) -> dict:
    """A GGUF file's metadata."""
    return read_gguf(path)[0]


def gguf_tokenizer_spec(path: Path, fields: dict) -> tuple[dict, dict]:
    """The tokenizer.json content and tokenizer_config names of a GGUF file's byte-level BPE vocabulary.
    Token types: 1 normal, 3 control (special added tokens), 4 user-defined (added, not special, and kept in
    the vocabulary, as GPT-NeoX's space runs are); llama.cpp's [PAD<n>] fillers are left out."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF vocabulary of type {kind!r}; nanofuse reads byte-level BPE ('gpt2') "
                             f"and sentencepiece ('llama') vocabularies from GGUF; use the model's tokenizer "
                             f"files instead")
    pre = fields.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRE:
        raise TokenizerError(f"{path}: pre-tokenizer {pre!r} is unknown (known: {', '.join(GGUF_PRE)}); use the "
                             f"model's tokenizer.json instead")
    pattern, nfc, ignore_merges = GGUF_PRE[pre]
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type")
    types = types or [1] * len(tokens)
    vocab, added = {}, []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 4 and re.fullmatch(r"\[PAD\d+\]", t):
            continue
        if ty in (1, 4):
            vocab[t] = i
        if ty in (3, 4):
            added.append({"id": i, "content": t, "special": ty == 3, "normalized": ty == 4})
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": list(fields.get("tokenizer.ggml.merges") or []),
                      "ignore_merges": ignore_merges},
            "normalizer": {"type": "NFC"} if nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
            "added_tokens": added}
    config = {}
    for name in ("bos", "eos"):
        i = fields.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None and int(i) < len(tokens):
            config[f"{name}_token"] = tokens[int(i)]
    return spec, config


def sentencepiece_model_bytes(pieces: list[tuple[str, float, int]], bpe: bool, byte_fallback: bool,
                              add_dummy_prefix: bool, unk_id: int | None) -> bytes:
    """A sentencepiece ModelProto, written in protobuf's wire format by hand (no protobuf needed): the pieces
    (text, score, type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the model type, byte
    fallback, and an identity normaliser that writes spaces as U+2581 (what GGUF's llama vocabularies assume)."""
    import struct

    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def key(field, wire):
        return varint(field << 3 | wire)

    def blob(field, data: bytes):
        return key(field, 2) + varint(len(data)) + data

    def number(field, n):
        return key(field, 0) + varint(n)

    out = bytearray()
    for text, score, kind in pieces:
        out += blob(1, blob(1, text.encode()) + key(2, 5) + struct.pack("<f", score) + number(3, kind))
    trainer = number(3, 2 if bpe else 1) + number(35, int(byte_fallback))
    if unk_id is not None:
        trainer += number(40, unk_id)
    out += blob(2, trainer)
    out += blob(3, blob(1, b"identity") + number(3, int(add_dummy_prefix)) + number(4, 0) + number(5, 1))
    return bytes(out)


def gguf_sentencepiece(path: Path, fields: dict) -> "SentencePieceTokenizer":
    """A GGUF file's sentencepiece-style ('llama') vocabulary, run by the sentencepiece library: Llama-2,
    Mistral, Gemma. The scores decide a BPE vocabulary's merges (llama.cpp's convention: Gemma's are BPE)."""
    tokens, scores = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.scores")
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    scores = scores or [0.0] * len(tokens)
    # sentencepiece allows one unknown piece: the file's unknown_token_id. llama.cpp also types its [PAD<n>]
    # fillers (Phi-3) as unknown; they become unused pieces, which the encoder never emits
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    types = [5 if kind == 2 and i != unk else kind for i, kind in enumerate(types)]
    if unk is not None:
        types[unk] = 2
    # llama.cpp writes user-defined pieces (Gemma's runs of spaces, tabs, newlines) with plain spaces; sentencepiece
    # matches them after its normaliser has turned spaces into U+2581
    pieces = [(t.replace(" ", "\u2581") if kind == 4 else t, float(x), int(kind))
              for t, x, kind in zip(tokens, scores, types)]
    is_bpe = fields.get("general.architecture", "").startswith("gemma") or any(t == 6 for t in types)
    model = sentencepiece_model_bytes(pieces, bpe=is_bpe, byte_fallback=any(t == 6 for t in types),
                                      add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)),
                                      unk_id=fields.get("tokenizer.ggml.unknown_token_id"))
    tok = SentencePieceTokenizer(path, model_proto=model)
    for name in ("bos", "eos"):
        i = fields.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None:
            setattr(tok, f"{name}_id", int(i))
    tok.add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True)) and tok.bos_id is not None
    return tok


def load_tokenizer_file(path: Path, config: dict | None = None) -> Tokenizer:
    config = config or {}
    if path.suffix == ".gguf":
        fields = gguf_fields(path)
        if fields.get("tokenizer.ggml.model") == "llama":
            return gguf_sentencepiece(path, fields)
        spec, names = gguf_tokenizer_spec(path, fields)
        tok = bpe_from_spec(spec, path, {**names, **config})
        tok.add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False)) and tok.bos_id is not None
        return tok
    if path.suffix == ".json":
        return _load_tokenizer_json(path, config)
    if path.suffix in (".model", ".tiktoken"):
        return SentencePieceTokenizer(path) if _is_sentencepiece(path) else _load_tiktoken_file(path, config)
    raise TokenizerError(f"{path}: unknown tokenizer file kind; expected tokenizer.json (byte-level BPE) or "
                         f"tokenizer.model (sentencepiece or Llama-3 tiktoken format)")
