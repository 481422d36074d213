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
    string. vocab_size counts every id, special tokens included."""

    kind: str
    vocab_size: int
    special: set[str]      # display strings of special/control tokens
    bos_id: int | None
    eos_id: int | None
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

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}); expected a tokenizer.model "
                                 f"from a Llama-2/Mistral-style checkpoint") from None
        n = self.sp.get_piece_size()
        self.vocab_size = n
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
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
    """A byte-level BPE run by tiktoken. ranks: token bytes -> rank; rank_to_id maps ranks to our ids;
    added: text -> id for tokens matched in the text before BPE (HF's added tokens)."""

    def __init__(self, kind, name, pattern, ranks: dict[bytes, int], rank_to_id: np.ndarray,
                 added: dict[str, int], special: set[str], bos_id, eos_id, nfc=False):
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
            self.piece_bytes[int(rank_to_id[r])] = b
        self.pieces = [bytes_to_display(b) for b in self.piece_bytes]
        for s, i in added.items():
            self.piece_bytes[i] = s.encode()
            self.pieces[i] = s

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
        return self.rank_to_id[self.enc.encode_ordinary(text)].tolist()


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
    return TiktokenBPE("tiktoken", path.name, LLAMA3_PATTERN, ranks, rank_to_id, special, set(special), bos, eos)


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
    pattern = None
    for s in steps:
        t = s.get("type")
        if t == "Split" and pattern is None and "Regex" in (s.get("pattern") or {}):
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
                pattern = GPT2_PATTERN
        else:
            raise bad(f"pre-tokenizer {t!r} is not supported")
    if pattern is None or not any(s.get("type") == "ByteLevel" for s in steps):
        raise bad("the pre-tokenizer is not byte-level")

    vocab: dict[str, int] = model.get("vocab") or {}
    to_byte = unicode_to_bytes()
    try:
        tok_bytes = {tok: bytes(to_byte[c] for c in tok) for tok in vocab}
    except KeyError:
        raise bad("the vocabulary has tokens that are not byte-level (outside GPT-2's byte table)") from None
    byte_ids = {b: i for tok, i in vocab.items() if len(b := tok_bytes[tok]) == 1}
    if len(byte_ids) != 256:
        raise bad(f"the vocabulary has {len(byte_ids)} of the 256 single-byte tokens; tiktoken needs all of them")
    # ranks: single bytes first, then one rank per merged token in merge order
    ranks = {b: v for v, b in enumerate(sorted(byte_ids))}
    rank_ids = [byte_ids[b] for b in sorted(byte_ids)]
    last = None
    for n, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        tok = a + b
        if tok not in vocab:
            raise bad(f"merge {n} ({a!r} {b!r}) makes {tok!r}, which is not in the vocabulary")
        tb = tok_bytes[tok]
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
            if tok_bytes[tok] not in ranks:
                ranks[tok_bytes[tok]] = len(ranks)
                rank_ids.append(i)
    added, special, unreachable = {}, set(), {}
    for a in spec.get("added_tokens") or []:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise bad(f"added token {a['content']!r} uses lstrip/rstrip/single_word")
        added[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["content"])
    for tok, i in vocab.items():
        if tok_bytes[tok] not in ranks and i not in added.values():
            unreachable[i] = tok      # no merge makes it, but its id exists: keep its bytes for decode
    tk = TiktokenBPE("bpe", path.name, pattern, ranks, np.asarray(rank_ids, dtype=np.int64), added, special,
                     None, None, nfc=bool(norm))
    for i, tok in unreachable.items():
        tk.piece_bytes[i], tk.pieces[i] = tok_bytes[tok], tok
    table = {**{t: i for t, i in vocab.items()}, **added}
    tk.bos_id = _named_id(config.get("bos_token"), table)
    tk.eos_id = _named_id(config.get("eos_token"), table)
    if tk.bos_id is None and "bos_token" not in config:
        tk.bos_id = next((table[s] for s in ("<|begin_of_text|>", "<s>", "<|startoftext|>") if s in table), None)
    if tk.eos_id is None and "eos_token" not in config:
        tk.eos_id = next((table[s] for s in ("<|end_of_text|>", "</s>", "<|endoftext|>") if s in table), None)
    return tk


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
                return load_tokenizer_file(c, config)
            except TokenizerError as e:
                first_error = first_error or e
        raise first_error
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file or folder")
    return load_tokenizer_file(path, config)


def load_tokenizer_file(path: Path, config: dict | None = None) -> Tokenizer:
    config = config or {}
    if path.suffix == ".json":
        return _load_tokenizer_json(path, config)
    if path.suffix in (".model", ".tiktoken"):
        return SentencePieceTokenizer(path) if _is_sentencepiece(path) else _load_tiktoken_file(path, config)
    raise TokenizerError(f"{path}: unknown tokenizer file kind; expected tokenizer.json (byte-level BPE) or "
                         f"tokenizer.model (sentencepiece or Llama-3 tiktoken format)")
