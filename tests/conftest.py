"""Shared helpers: the mixed text every tokenizer must survive, and tiny models and real tokenizer files."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The suite has no GPU: Triton kernels (extras/triton_head.py) run in Triton's interpreter, which
# must be chosen before triton is first imported (its own library functions are made then).
os.environ["TRITON_INTERPRET"] = "1"

from extras.package_files import package_path  # noqa: E402

# English, code, whitespace runs, tabs and newlines, digits, CJK, emoji, combining accents.
MIXED_TEXT = (
    "The quick brown fox's 12345 jumps over 3.14159 lazy dogs.\n\n"
    "\tdef square(x):\n        return x ** 2  # squares it\n\n"
    "日本語のテキストと中文。 😀🚀👍🏽 café naïve e\u0301tude A\u030angstro\u0308m\n"
    "trailing spaces    \t\t mixed   runs\r\nλ = 0.9; x_1..x_n → y!"
)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3):
    """Overwrite every weight with large random values, so logits are far from zero and any mistake shows.
    Norm weights stay near one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed registry package (found without importing the package).
    Missing package: skipped locally, an error under CI, where .ci/run installs them."""
    path = package_path(package, *parts)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"package {package} is not installed; .ci/run installs it")
        pytest.skip(f"package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    assert path.is_file(), f"{path} not found in package {package}"
    return path


def stdlib_texts(n: int = 20, max_chars: int = 20000) -> list[str]:
    """Python source files of the standard library: code with English comments, present on every machine."""
    import sysconfig
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace")[:max_chars] for f in files]


# --- a tiny world: corpus, target, sources, and its fusion-ready data (shared by data and training tests) ---
SEQ = 200


def sentencepiece_model(texts, vocab_size):
    """A Llama-2-style sentencepiece BPE (byte fallback, no normalisation) trained on the texts: the model file."""
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True)
    return buf.getvalue()


def byte_level_bpe(texts, vocab_size):
    """A GPT-2-style byte-level BPE trained on the texts with HF tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def trained_tokenizers(root, texts, sp_vocab: int, bpe_vocab: int):
    """A sentencepiece BPE (root/sp) and a byte-level BPE (root/bpe) trained on the texts, loaded
    with the project's load_tokenizer: (sentencepiece, bpe)."""
    from tokenizer import load_tokenizer
    (root / "sp").mkdir()
    (root / "sp" / "tokenizer.model").write_bytes(sentencepiece_model(texts, sp_vocab))
    (root / "bpe").mkdir()
    byte_level_bpe(texts, bpe_vocab).save(str(root / "bpe" / "tokenizer.json"))
    return load_tokenizer(root / "sp"), load_tokenizer(root / "bpe")


def llama(vocab, seed):
    import fusellm
    args = fusellm.ModelArgs(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                             sliding_layers=(False, False))
    return randomize_(fusellm.Transformer(args), seed, 0.1)


def mpt(vocab, seed):
    import fusellm
    args = fusellm.ModelArgs(model_type="mpt", vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                             head_dim=8, hidden_dim=128, norm="layer", mlp="gelu", tie_embeddings=True, pos="alibi",
                             norm_eps=1e-5, sliding_layers=(False, False))
    return randomize_(fusellm.Transformer(args), seed, 0.1)


def build_world(root, second_source: bool = False):
    """A corpus of standard-library code, a sentencepiece-BPE Llama target, a byte-level-BPE MPT
    source (and a second byte-level Llama source), all tiny and random, and fusion-ready data with
    the target and the first source: root / "data"."""
    import fusellm
    texts = stdlib_texts(26)
    (root / "corpus").mkdir()
    with open(root / "corpus" / "docs.jsonl", "w") as f:
        for t in texts[20:26]:
            f.write(json.dumps({"text": t[:2500]}) + "\n")
    fusellm.save_model(llama(400, 0), root / "target")
    (root / "target" / "tokenizer.model").write_bytes(sentencepiece_model(texts[:20], 400))
    fusellm.save_model(mpt(520, 1), root / "source")
    byte_level_bpe(texts[:20], 512).save(str(root / "source" / "tokenizer.json"))
    if second_source:
        fusellm.save_model(llama(700, 2), root / "source2")
        byte_level_bpe(texts[:10], 700).save(str(root / "source2" / "tokenizer.json"))
    run_pipeline(root, root / "data")
    return root


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """build_world with both sources, once for the session (robustness and parity tests)."""
    return build_world(tmp_path_factory.mktemp("world"), second_source=True)


def train_run(world, out, *extra):
    """train.py on a world's data: 6 steps of 4 windows, a checkpoint every 3, no export; the
    metrics it logged, one dict per step."""
    import train
    argv = ["--data", str(world / "data"), "--target", str(world / "target"), "--out", str(out),
            "--batch-size", "4", "--max-steps", "6", "--lr", "3e-3", "--warmup", "2", "--log-every",
            "1", "--ckpt-every", "3", "--no-export", *extra]
    train.train(train.parse_config(argv))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_pipeline(world, out, sources=("source",)):
    import data
    data.build_windows(world / "corpus", world / "target", [world / s for s in sources], out, seq_len=SEQ,
                       shard_windows=4, quiet=True)
    for name in ("target", *sources):
        data.compute_dists(out, world / name, name, topk=5, batch_size=3, quiet=True)
    return [data.align_source(out, s, quiet=True) for s in sources]


# --- processes a test starts: every one of them killed when it ends, whatever happened ---

def marked(marker: str) -> dict[int, dict[str, str]]:
    """The live processes whose environment holds NANOFUSE_TEST_RUN=marker, each with its
    environment: everything a test started, however deep, also once its parent is gone (a worker
    of a killed torchrun agent belongs to init)."""
    found = {}
    try:
        import psutil
        procs = [(q.pid, q.environ) for q in psutil.process_iter()]
    except ImportError:
        procs = [(int(d.name), (d / "environ").read_bytes) for d in Path("/proc").iterdir()
                 if d.name.isdigit()]
    for pid, environ in procs:
        try:
            env = environ()
        except Exception:                       # gone meanwhile, or not ours to read
            continue
        if isinstance(env, bytes):              # /proc: NAME=value, NUL-separated
            env = dict(v.split("=", 1) for v in env.decode(errors="replace").split("\0")
                       if "=" in v)
        if env.get("NANOFUSE_TEST_RUN") == marker:
            found[pid] = env
    return found


@contextlib.contextmanager
def whole(command, **popen):
    """Popen(command) in a session of its own, marked (NANOFUSE_TEST_RUN in its environment, which
    whatever it starts inherits); on leaving, whatever happened, every marked process killed with
    its process group (torchrun starts each worker in a session of its own, out of reach of a
    kill of torchrun's group), and none may survive. Yields (the process, its marker)."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOFUSE_TEST_RUN": marker}
    p = subprocess.Popen(command, env=env, start_new_session=True, **popen)
    try:
        yield p, marker
    finally:
        if p.poll() is None:                    # its own group first, at once (torchrun's agent)
            os.killpg(p.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while (left := marked(marker)) and time.time() < deadline:
            for pid in left:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) != os.getpgrp():
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=0.1)
        p.wait()
        left = {pid: env.get("RANK", "agent") for pid, env in marked(marker).items()}
        assert left == {}, "processes (pid: rank) outlived the test"
