"""extras/tokenizer_files.py: which tokenizer file a checkpoint has, and which engine runs it.

Why it exists: a learner needs one tokenizer and its encode. A user points nanofuse at whatever a
checkpoint ships: a folder with a tokenizer.json and/or a tokenizer.model (sentencepiece's protobuf,
or Llama-3's tiktoken text under the same name), a tokenizer_config.json beside them that names BOS
and EOS and may set add_bos_token, or a GGUF file whose vocabulary is sentencepiece's ("llama") or a
byte-level BPE ("gpt2"). This file decides which files to try, in which order, and reads one into
the keyword arguments of the engine that runs it, as plain data; tokenizer.load_tokenizer builds the
tokenizer from them.

What it holds: tokenizer_files (the files to try for a folder or a path, and its
tokenizer_config.json) and read_tokenizer_file (one file -> ("sentencepiece" or "tiktoken", the
keyword arguments of tokenizer.SentencePieceTokenizer or tokenizer.TiktokenBPE)). The formats
themselves are read by extras/tokenizer_json.py and extras/gguf.py. Errors are
extras.format_error.FormatError; tokenizer.py turns them into TokenizerError.
"""
from __future__ import annotations

from pathlib import Path

from extras import gguf, tokenizer_json
from extras.format_error import FormatError


def tokenizer_files(path: Path) -> tuple[list[Path], dict]:
    """(the files to try, in order; the tokenizer_config.json beside them, or {}). In a folder, a
    byte-level BPE tokenizer.json comes first, then tokenizer.model (sentencepiece or Llama-3
    tiktoken format); a file given directly is the only one."""
    config = tokenizer_json.read_tokenizer_config(path if path.is_dir() else path.parent)
    if path.is_dir():
        files = [c for c in (path / "tokenizer.json", path / "tokenizer.model") if c.is_file()]
        if not files:
            raise FormatError(f"{path}: no tokenizer.json or tokenizer.model; copy the "
                              f"checkpoint's tokenizer files into the folder")
    elif path.is_file():
        files = [path]
    else:
        raise FormatError(f"{path}: no such tokenizer file or folder")
    return files, config


def read_tokenizer_file(path: Path, config: dict) -> tuple[str, dict]:
    """One tokenizer file, by its kind: ("sentencepiece", the keyword arguments of
    tokenizer.SentencePieceTokenizer besides the path; none for a tokenizer.model, which
    sentencepiece reads itself) or ("tiktoken", those of tokenizer.TiktokenBPE). Where
    tokenizer_config.json sets add_bos_token, it decides BOS."""
    alphabet = tokenizer_json.bytes_to_unicode()
    if path.suffix == ".gguf":
        fields = gguf.gguf_fields(path)
        if fields.get("tokenizer.ggml.model") == "llama":
            engine, spec = "sentencepiece", gguf.gguf_sentencepiece(path, fields)
        else:
            engine, spec = "tiktoken", gguf.gguf_bpe(path, fields, config, alphabet)
    elif path.suffix == ".json":
        engine, spec = "tiktoken", tokenizer_json.read_tokenizer_json(path, config, alphabet)
    elif path.suffix in (".model", ".tiktoken") and tokenizer_json.is_tiktoken_file(path):
        engine, spec = "tiktoken", tokenizer_json.read_tiktoken_file(path, config)
    elif path.suffix in (".model", ".tiktoken"):
        engine, spec = "sentencepiece", {}
    else:
        raise FormatError(f"{path}: unknown tokenizer file kind; expected tokenizer.json "
                          f"(byte-level BPE) or tokenizer.model (sentencepiece or Llama-3 "
                          f"tiktoken format)")
    if isinstance(config.get("add_bos_token"), bool):   # where it says, it decides BOS
        spec["add_bos"] = config["add_bos_token"]
    return engine, spec
