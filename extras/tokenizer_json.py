"""extras/tokenizer_json.py: Hugging Face tokenizer.json and Llama-3's tiktoken file, read into the
data tokenizer.TiktokenBPE runs on.

Why it exists: a learner needs only that a byte-level BPE is a table of ranks that tiktoken runs. A
real checkpoint's tokenizer.json says much more, in many spellings (normalizers, pre-tokenizer
sequences, added tokens, unknown tokens, ignore_merges, post-processors), and giving a source
model's exact ids needs every one of them read and every setting we cannot reproduce refused by
name. This file checks a tokenizer.json, and Llama-3's tokenizer.model, and returns plain data
(ranks, ids, regex, special tokens) as the keyword arguments of tokenizer.TiktokenBPE.

Why tiktoken can run a Hugging Face BPE exactly. HF BPE repeatedly applies the merge rule of lowest
index among the adjacent pairs; tiktoken repeatedly joins the adjacent pair whose *concatenation*
has the lowest rank. These agree when every token's rank is the index of the merge rules that
produce it, which requires the rules producing one token to sit next to each other in the merge list
(checked below; a file that breaks it gets an error). tiktoken returns ranks; a lookup table turns
them into the file's ids. tiktoken also tries the whole pre-token first, which is HF's
`ignore_merges`. When tiktoken's joins could differ from the rules (a token that two tokens make
without a rule), `exact` asks tokenizer.TiktokenBPE to run HF's algorithm itself
(extras/bpe_rules.py).

It also holds GPT-2's byte alphabet (bytes_to_unicode), in which a byte-level vocabulary writes its
tokens, and token_table: the bytes and display string of every id of a tokenizer.TiktokenBPE.

Errors are extras.format_error.FormatError; tokenizer.py turns them into TokenizerError.
"""
from __future__ import annotations

import base64
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from extras.format_error import FormatError

# The GPT-2 pre-tokenizer regex that HF's ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# StarCoder: HF's Digits(individual_digits) before the GPT-2 regex, as one regex: every numeric
# character (\p{N}, "½" too) a piece of its own, and a whitespace run before one taken whole, as
# the GPT-2 regex takes a run that ends its text (HF runs it on the text between the digits).
STARCODER_PATTERN = (GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")
                     .replace(r"\s+(?!\S)", r"\s+(?=\p{N})|\s+(?!\S)"))
# Llama-3's pattern (also what its tiktoken-format tokenizer.model needs).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: Llama-3's with single digits.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MAX_ID = 2**24 - 1      # the largest token id read (the largest vocabularies: Gemma's 262,144 ids)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the rest to
    U+0100 onwards in order (space -> 'Ġ', newline -> 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_table(vocab_size: int, ranks: dict[bytes, int], rank_to_id: np.ndarray,
                added: dict[str, int], unreachable: dict | None) -> tuple[list[bytes], list[str]]:
    """(bytes per id, display string per id) of a byte-level BPE: a ranked token's bytes, written
    in GPT-2's printable bytes (bytes_to_unicode); an added token's text; and the bytes and display
    string the file gives for the tokens no merge makes (`unreachable`: id -> (bytes, display))."""
    piece_bytes = [b""] * vocab_size
    for b, r in ranks.items():
        if rank_to_id[r] >= 0:
            piece_bytes[int(rank_to_id[r])] = b
    alphabet = bytes_to_unicode()           # display strings: GPT-2's printable bytes
    pieces = ["".join(alphabet[x] for x in b) for b in piece_bytes]
    for s, i in added.items():
        piece_bytes[i] = s.encode()
        pieces[i] = s
    for i, (b, display) in (unreachable or {}).items():
        piece_bytes[i], pieces[i] = b, display
    return piece_bytes, pieces


def read_tokenizer_config(folder: Path) -> dict:
    """A folder's tokenizer_config.json (names BOS and EOS, may set add_bos_token), or {}."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}    # unreadable as a config: none, as above


def is_tiktoken_file(path: Path) -> bool:
    """Whether a tokenizer.model is in tiktoken's format ('base64 rank' lines), not sentencepiece's
    protobuf."""
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        first = head.decode("ascii").split("\n", 1)[0]
    except UnicodeDecodeError:
        return False
    return bool(re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", first))


def read_tiktoken_file(path: Path, config: dict) -> dict:
    """Llama-3's tokenizer.model: 'base64(token) rank' per line; its special tokens come from code
    (Llama 3.1 names), or from tokenizer_config.json's added_tokens_decoder when the folder has
    one."""
    ranks = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 ({e}); not a tiktoken-format tokenizer.model, or a "
                          f"damaged one: copy the checkpoint's file again") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise FormatError(f"{path}:{n}: not a 'base64 rank' line; not a tiktoken-format "
                              f"tokenizer.model") from None
    n_base = len(ranks)
    if n_base != 128000:
        raise FormatError(f"{path}: a tiktoken-format file with {n_base} tokens; only Llama-3's "
                          f"(128000 tokens) is known, since the file carries neither its regex nor "
                          f"its special tokens. Use the checkpoint's tokenizer.json instead")
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    special = {s: n_base + i for i, s in enumerate(LLAMA3_SPECIALS + reserved)}
    decoder = config.get("added_tokens_decoder") or {}
    if decoder:
        special = added_tokens_decoder(path.parent / "tokenizer_config.json", decoder)
    if sorted(ranks.values()) != list(range(n_base)):
        raise FormatError(f"{path}: ranks are not 0..{n_base - 1}; not a Llama-3 tokenizer.model")
    bos = named_id(config.get("bos_token"), special) or special.get("<|begin_of_text|>")
    eos = named_id(config.get("eos_token"), special) or special.get("<|end_of_text|>")
    return dict(kind="tiktoken", name=path.name, pattern=LLAMA3_PATTERN, ranks=ranks,
                rank_to_id=np.arange(n_base, dtype=np.int64), added=special, special=set(special),
                bos_id=bos, eos_id=eos,
                add_bos=bos is not None)        # Llama-3 starts every text with <|begin_of_text|>


def added_tokens_decoder(path: Path, decoder) -> dict[str, int]:
    """tokenizer_config.json's added_tokens_decoder ({"id": {"content": text, ...}}) as
    {text: id}, checked: ids from 0 to MAX_ID, non-empty texts."""
    table = {}
    for k, v in decoder.items() if isinstance(decoder, dict) else [(None, None)]:
        content = v.get("content") if isinstance(v, dict) else None
        id_ok = (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 9
                 and int(k) <= MAX_ID)
        if not id_ok or not isinstance(content, str) or not content:
            raise FormatError(f"{path}: added_tokens_decoder is not {{id: {{\"content\": text}}}} "
                              f"with ids from 0 to {MAX_ID:,} (at {k!r}); fix or remove it")
        table[content] = int(k)
    return table


def named_id(tok, table):
    """The id of a token named in tokenizer_config.json (a string or {"content": ...}), or None."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return table.get(tok) if isinstance(tok, str) and tok else None    # else none named


def read_tokenizer_json(path: Path, config: dict, alphabet: dict[int, str]) -> dict:
    """A Hugging Face tokenizer.json with a byte-level BPE model, checked to be runnable exactly."""
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:    # nested too deep
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    return bpe_from_spec(spec, path, config, alphabet)


def pre_tokenizer_pattern(spec: dict, bad) -> str:
    """The one regex of a byte-level pre-tokenizer: ByteLevel with the GPT-2 regex, or
    Split(regex, Isolated) + ByteLevel(use_regex=False), or StarCoder's Digits + ByteLevel."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    pattern, digits = None, False
    for s in steps:
        t = s.get("type")
        if t == "Digits" and s.get("individual_digits") and pattern is None and not digits:
            digits = True                       # StarCoder: every numeric character alone
        elif (t == "Split" and pattern is None and not digits
              and "Regex" in (s.get("pattern") or {})):
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise bad(f"Split behavior {s.get('behavior')!r} invert={s.get('invert')} is not "
                          f"supported")
            pattern = s["pattern"]["Regex"]
            if re.search(r"\{\d+(,\d*)?\}\+", pattern):
                raise bad("the Split regex uses a '{n,m}+' quantifier, which HF's regex engine "
                          "reads as a repeated repeat and tiktoken as possessive; they split digit "
                          "runs differently")
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
    import tiktoken
    try:                    # the file's regex, compiled by the engine that will run it
        tiktoken.Encoding("check", pat_str=pattern, mergeable_ranks={b"a": 0}, special_tokens={})
    except ValueError as e:
        raise bad(f"the pre-tokenizer regex {pattern!r} does not compile ({e})") from None
    return pattern


def bpe_from_spec(spec: dict, path: Path, config: dict, alphabet: dict[int, str]) -> dict:
    """tokenizer.TiktokenBPE(**these) for a tokenizer.json's content (read from the file, or rebuilt
    from a GGUF). alphabet: GPT-2's byte -> printable character table (bytes_to_unicode above),
    in which a byte-level vocabulary writes its tokens."""
    def bad(what):
        return FormatError(
            f"{path}: {what}; nanofuse runs byte-level BPE tokenizer.json files exactly (GPT-2, "
            f"GPT-NeoX, Llama-3, Qwen2 style) and sentencepiece models through tokenizer.model")

    if wrong := wrong_shape(spec):
        raise bad(wrong)
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
    pattern = pre_tokenizer_pattern(spec, bad)

    vocab: dict[str, int] = model.get("vocab") or {}
    added_specs = spec.get("added_tokens") or []
    added_text = {a["id"]: a["content"] for a in added_specs}
    byte_of = {c: b for b, c in alphabet.items()}
    tok_bytes = {}
    for tok, i in vocab.items():
        # GPT-NeoX keeps its space-run added tokens in the vocabulary as plain text
        if i in added_text:
            tok_bytes[tok] = added_text[i].encode()
            continue
        try:
            tok_bytes[tok] = bytes(byte_of[c] for c in tok)
        except KeyError:
            raise bad(f"vocabulary token {tok!r} (id {i}) is neither byte-level text nor an added "
                      f"token") from None
    byte_ids = {b: i for tok, i in vocab.items()
                if len(b := tok_bytes[tok]) == 1 and i not in added_text}
    # ranks: single bytes first, then one rank per merged token in merge order
    ranks = {b: v for v, b in enumerate(sorted(byte_ids))}
    rank_ids = [byte_ids[b] for b in sorted(byte_ids)]
    last, rules = None, {}
    for n, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        tok = a + b
        if tok not in vocab or a not in vocab or b not in vocab:
            raise bad(f"merge {n} ({a!r} {b!r}) joins or makes a token that is not in the "
                      f"vocabulary")
        tb = tok_bytes[tok]
        rules.setdefault((tok_bytes[a], tok_bytes[b]), n)
        if tb in ranks:
            if tok != last:
                raise bad(f"merge {n} makes {tok!r} again after other merges; its rules are not "
                          f"contiguous, so no rank order reproduces this merge order")
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
    # Bytes without a token (StarCoder's vocabulary has 242 of the 256; the 14 missing never occur
    # in UTF-8 text): tiktoken needs every byte, so each gets the last ranks, which no merge uses,
    # and id -1; HF drops such a byte, or writes the unknown token when the file names one.
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = len(ranks)
            rank_ids.append(-1)
    unk_id = vocab.get(model["unk_token"]) if model.get("unk_token") else None
    # tiktoken joins any two adjacent parts whose bytes form a token; HF only the pairs its rules
    # list. They agree when every way to cut a token into two tokens is a rule. Otherwise the exact
    # path runs HF's algorithm in Python (slower, cached per pre-token).
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
            # no merge makes it, but its id exists: keep its bytes for decode
            unreachable[i] = (tok_bytes[tok], tok)
    table = {**{t: i for t, i in vocab.items()}, **added}
    bos_id = named_id(config.get("bos_token"), table)
    eos_id = named_id(config.get("eos_token"), table)
    if bos_id is None and "bos_token" not in config:
        bos_id = next((table[s] for s in ("<|begin_of_text|>", "<s>", "<|startoftext|>")
                       if s in table), None)
    if eos_id is None and "eos_token" not in config:
        eos_id = next((table[s] for s in ("<|end_of_text|>", "</s>", "<|endoftext|>")
                       if s in table), None)
    # the special token HF's encode puts first, if any
    first = template_start(spec.get("post_processor"))
    add_bos = first is not None and first in table
    if add_bos and bos_id is None:
        bos_id = table[first]
    return dict(kind="bpe", name=path.name, pattern=pattern, ranks=ranks,
                rank_to_id=np.asarray(rank_ids, dtype=np.int64), added=added, special=special,
                bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, nfc=bool(norm),
                merges_only=not model.get("ignore_merges"), unk_id=unk_id,
                fuse_unk=bool(model.get("fuse_unk")), rules=rules, exact=exact,
                unreachable=unreachable)


def wrong_shape(spec) -> str | None:
    """What has the wrong JSON type in the parts of a tokenizer.json that bpe_from_spec reads, or
    None. Checked first, so that a damaged or hand-edited file is named with what is wrong rather
    than met as a TypeError deep inside. Ids are integers from 0 to MAX_ID: a vocabulary may have
    holes (llama.cpp fills them with [PAD<n>] tokens), but not a table of billions of ids."""
    def objects(x):
        return isinstance(x, list) and all(isinstance(v, dict) for v in x)

    def is_id(i):
        return type(i) is int and 0 <= i <= MAX_ID

    def is_pair(m):                         # a merge: "a b", or ["a", "b"]
        return ((isinstance(m, str) and " " in m) or
                (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)))

    if not isinstance(spec, dict):
        return "the file is not a JSON object"
    for key in ("model", "normalizer", "pre_tokenizer", "post_processor"):
        if not isinstance(spec.get(key) or {}, dict):
            return f"{key} is not an object"
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    vocab, added = model.get("vocab") or {}, spec.get("added_tokens") or []
    merges = model.get("merges") or []
    if not isinstance(vocab, dict) or not all(isinstance(t, str) and is_id(i)
                                              for t, i in vocab.items()):
        return f"model.vocab is not an object of token: id (an integer from 0 to {MAX_ID:,})"
    if not objects(added) or not all(isinstance(a.get("content"), str) and a["content"]
                                     and is_id(a.get("id")) for a in added):
        return (f'added_tokens is not a list of {{"id": an integer from 0 to {MAX_ID:,}, '
                f'"content": text}}')
    if len(set(vocab.values())) < len(vocab):
        return "two tokens of model.vocab have the same id"
    if not isinstance(merges, list) or not all(map(is_pair, merges)):
        return 'model.merges is not a list of "a b" strings or ["a", "b"] pairs'
    if not isinstance(model.get("unk_token") or "", str):
        return "model.unk_token is not a string"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    patterns = [s.get("pattern") or {} for s in steps] if objects(steps) else [None]
    if not all(isinstance(p, dict) and isinstance(p.get("Regex", ""), str) for p in patterns):
        return "pre_tokenizer is not a list of pre-tokenizers with a pattern object each"
    return wrong_template(spec.get("post_processor") or {})


def wrong_template(post: dict) -> str | None:
    """What has the wrong JSON type in a post-processor that template_start reads, or None."""
    if post.get("type") == "Sequence":
        parts = post.get("processors")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            return "post_processor.processors is not a list of objects"
        return next(filter(None, map(wrong_template, parts)), None)
    if post.get("type") != "TemplateProcessing" or not post.get("single"):
        return None
    head = post["single"][0] if isinstance(post["single"], list) else None
    special = head.get("SpecialToken", {"id": ""}) if isinstance(head, dict) else None
    if not isinstance(special, dict) or not isinstance(special.get("id"), str):
        return "post_processor.single does not start with a piece or a special token"
    return None


def template_start(post: dict | None) -> str | None:
    """The special token a tokenizer.json's post-processor puts before a single text
    (TemplateProcessing, e.g. "<|begin_of_text|> $A" or "<bos> $A", possibly inside a Sequence), or
    None (ByteLevel, none at all)."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        starts = (t for t in map(template_start, post.get("processors", [])) if t is not None)
        return next(starts, None)
    if post.get("type") == "TemplateProcessing" and post.get("single"):
        head = post["single"][0]
        return head["SpecialToken"]["id"] if "SpecialToken" in head else None
    return None
