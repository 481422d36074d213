"""
tokenizer.py: the tokenizers of real checkpoints, without `transformers`.

One small interface (`Tokenizer`), two engines, every tokenizer file nanofuse reads:
- `SentencePieceTokenizer` (the `sentencepiece` library): the `tokenizer.model` of Llama-2,
  OpenLLaMA, Mistral or Gemma, and a GGUF file's "llama" vocabulary (Llama-2, Mistral, Gemma,
  Phi-3);
- `TiktokenBPE` (`tiktoken`): a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, GPT-NeoX/MPT,
  StarCoder, Llama-3, Qwen2, ...), Llama-3's tiktoken-format `tokenizer.model`, and a GGUF file's
  "gpt2" vocabulary with a pre-tokenizer extras/gguf.py knows (GGUF_PRE: gpt-2, mpt, gpt-neox,
  starcoder, refact, llama-bpe, qwen2).
Which file a checkpoint has and which engine runs it is decided in extras/tokenizer_files.py; the
files are parsed into plain data in extras/ (tokenizer_json.py, gguf.py), which also says why
tiktoken runs a Hugging Face BPE exactly (extras/bpe_rules.py: the exceptions); this file runs it.

Each token also has its bytes and its display string in the HF convention (`▁the`, `Ġthe`,
`<0x0A>`); `normalize` writes its bytes in one form for every tokenizer, which alignment compares.
Special/control tokens of sentencepiece stand for no bytes; added tokens of a tokenizer.json stand
for their text.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer file that cannot be run exactly; the message names the file and the fix."""


class Tokenizer:
    """encode(text) -> ids (no BOS/EOS added), decode(ids) -> text, and per token its bytes and
    display string. vocab_size counts every id, special tokens included. add_bos: whether the
    checkpoint's own tokenizer puts BOS before a text by default (what Hugging Face's encode does:
    Llama, Mistral, Gemma do; GPT-2, Qwen2 do not); evaluation follows it unless told otherwise."""

    kind: str
    vocab_size: int
    special: set[str]          # display strings of special/control tokens
    bos_id: int | None
    eos_id: int | None
    add_bos: bool = False
    pieces: list[str]          # display string per id (HF convention)
    piece_bytes: list[bytes]   # bytes per id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return b"".join(self.piece_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        return self.pieces[i]

    def token_bytes(self, i: int) -> bytes:
        return self.piece_bytes[i]

    def __repr__(self):
        return (f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} bos={self.bos_id} "
                f"eos={self.eos_id}>")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model from a file, or from `model_proto` bytes built in memory (a GGUF
    vocabulary), whose bos_id / eos_id / add_bos may then be given."""
    kind = "sentencepiece"

    def __init__(self, path: Path, model_proto: bytes | None = None, bos_id=None, eos_id=None,
                 add_bos=True):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is not None:
                self.sp.load_from_serialized_proto(model_proto)
            else:
                self.sp.load(str(path))
            self.pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        except (OSError, RuntimeError, UnicodeDecodeError) as e:   # UTF-8: a damaged piece
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}); expected a "
                                 f"tokenizer.model from a Llama-2/Mistral-style "
                                 f"checkpoint") from None
        self.vocab_size = len(self.pieces)
        self.bos_id = bos_id if bos_id is not None else self.sp.bos_id()
        self.eos_id = eos_id if eos_id is not None else self.sp.eos_id()
        self.bos_id = self.bos_id if self.bos_id >= 0 else None
        self.eos_id = self.eos_id if self.eos_id >= 0 else None
        self.add_bos = add_bos and self.bos_id is not None   # Hugging Face's LlamaTokenizer default
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
    """A byte-level BPE run by tiktoken. ranks: token bytes -> rank; rank_to_id maps ranks to our
    ids (-1: a byte the vocabulary has no token for: dropped, as HF drops it, or `unk_id` when the
    file names one); added: text -> id for tokens matched in the text before BPE (HF's added
    tokens). The file's merge rules (`rules`: byte pair -> merge index) give the ids where tiktoken
    alone could differ from HF (extras/bpe_rules.py): `exact` runs HF's algorithm itself;
    `merges_only` (the file's BPE has ignore_merges false) sends a pre-token that is itself a token
    through the merges. unreachable: id -> (bytes, display string) of the tokens no merge makes."""

    def __init__(self, kind, name, pattern, ranks: dict[bytes, int], rank_to_id: np.ndarray,
                 added: dict[str, int], special: set[str], bos_id, eos_id, add_bos=False,
                 nfc=False, merges_only=False, unk_id=None, fuse_unk=False,
                 rules: dict | None = None, exact: bool = False, unreachable: dict | None = None):
        import tiktoken
        from extras.tokenizer_json import token_table
        self.kind = kind
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={})
        self.rank_to_id = rank_to_id
        self.added, self.special, self.nfc = added, special, nfc
        by_length = sorted(added, key=len, reverse=True)      # cut out of the text before BPE
        self.split = re.compile("|".join(map(re.escape, by_length))) if added else None
        self.vocab_size = max([int(rank_to_id.max()), *added.values(), *(unreachable or ())]) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        # per id: its bytes, and its display string in GPT-2's printable bytes (`Ġthe`)
        self.piece_bytes, self.pieces = token_table(self.vocab_size, ranks, rank_to_id, added,
                                                    unreachable)
        self.unk_id, self.fuse_unk = unk_id, fuse_unk
        self.has_holes = bool((rank_to_id < 0).any())
        self.merges_only, self.exact = merges_only, exact
        if exact or merges_only:
            from extras.bpe_rules import RulesBPE
            self.by_rules = RulesBPE(pattern, ranks, rules, merges_only)

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
        """Text without added tokens -> ids: tiktoken's ranks (or HF's), then the file's ids."""
        if not text:
            return []
        if self.exact:                          # HF's own algorithm, pre-token by pre-token
            r = self.by_rules.ranks_of(text)
        else:                                   # the fast path: tiktoken
            r = np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)
            if self.merges_only:                # whole-token pre-tokens, as HF's merges split them
                r = self.by_rules.through_merges(r)
        ids = self.rank_to_id[r]
        if self.has_holes:                      # bytes with no token: dropped, or the unknown token
            from extras.bpe_rules import bytes_without_token
            ids = bytes_without_token(ids, self.unk_id, self.fuse_unk)
        return ids.tolist()


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a model folder, or a tokenizer file given directly. In a folder, a
    byte-level BPE tokenizer.json comes first, then tokenizer.model (sentencepiece or Llama-3
    tiktoken format). tokenizer_config.json beside it names BOS/EOS and may set add_bos_token."""
    from extras.format_error import raised_as
    from extras.tokenizer_files import tokenizer_files
    with raised_as(TokenizerError):         # the reader's FormatError, with the same message
        files, config = tokenizer_files(Path(path))
    errors = []
    for f in files:                         # the first that loads
        try:
            return load_tokenizer_file(f, config)
        except TokenizerError as e:
            errors.append(e)
    raise errors[0]


def load_tokenizer_file(path: Path, config: dict | None = None) -> Tokenizer:
    """One tokenizer file, by its kind. Which engine runs it, with what, is read into plain data in
    extras/ (whose FormatError becomes TokenizerError here); the tokenizer is built here."""
    from extras.format_error import raised_as
    from extras.tokenizer_files import read_tokenizer_file
    with raised_as(TokenizerError):
        engine, spec = read_tokenizer_file(path, config or {})
    if engine == "sentencepiece":
        return SentencePieceTokenizer(path, **spec)
    return TiktokenBPE(**spec)


# --------------------------------------------------------------------------------------------------
# Every token in one form: what alignment (align.py) compares across tokenizers

SPACE = "\u2581"          # '▁': how a normalized token writes a space
BYTE_BASE = 0xF700        # a stray byte b is written as chr(BYTE_BASE + b), a private-use character


def normalize(token_bytes: bytes) -> str:
    """The text of a token in one form for every tokenizer: the UTF-8 text of its bytes with each
    space written as '▁'. Sentencepiece's '▁the' and byte-level BPE's 'Ġthe' both become
    '▁the'; '<0x0A>' and 'Ċ' both become '\\n'. A byte that is not part of a complete UTF-8
    character inside this token (a byte-fallback piece, or a multi-byte character split across
    tokens) becomes one private-use character chr(0xF700 + byte), so it counts as one character in
    edit distances and equals only the same byte. Tokens with no bytes (control tokens such as <s>)
    normalize to ''."""
    out, i = [], 0
    while i < len(token_bytes):
        for n in (4, 3, 2, 1):                     # the longest valid UTF-8 character starting here
            try:
                ch = token_bytes[i:i + n].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1:
                out.append(SPACE if ch == " " else ch)
                i += n
                break
        else:
            out.append(chr(BYTE_BASE + token_bytes[i]))
            i += 1
    return "".join(out)


def normalized_vocab(tok) -> list[str]:
    """normalize() of every id of a tokenizer."""
    return [normalize(tok.token_bytes(i)) for i in range(tok.vocab_size)]
