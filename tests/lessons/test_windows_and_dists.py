"""Windows and stored distributions, the data.py lessons: a corpus is cut into windows every
tokenizer fits, each model's top-K next-token distribution is stored at each of its tokens
(log-probs in uint8 steps, one model's head computed whole or in blocks with the same result), and
an aligned source's entries are stored as padded rows, read back with a mask. Each test builds
its own small inputs."""
import json

import numpy as np
import pytest
import torch

import align
import data
import fusellm
from conftest import byte_level_bpe, llama, mpt, stdlib_texts, trained_tokenizers
from extras import fast_head, storage
from extras.corpus import CorpusStats, read_corpus


def test_corpus_counts_what_it_skips(tmp_path):
    """Empty documents, unreadable jsonl lines and invalid UTF-8 are counted, not fatal."""
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": ""}\nnot json\n{"other": 1}\n'
                                       b'{"text": "two"}\n')
    (tmp_path / "b.txt").write_bytes(b"first block\n\nsecond \xff block\n\n\n")
    stats = CorpusStats()
    docs = list(read_corpus(tmp_path, txt_docs="blocks", stats=stats))
    assert docs == ["one", "two", "first block", "second \ufffd block"]
    assert stats["bad_lines"] == 2 and stats["empty"] == 2 and stats["invalid_utf8"] == 1
    assert stats["bad_line_examples"] == [f"{tmp_path / 'a.jsonl'}:3", f"{tmp_path / 'a.jsonl'}:4"]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A sentencepiece BPE and a byte-level BPE, trained here on standard-library code."""
    return list(trained_tokenizers(tmp_path_factory.mktemp("tokenizers"), stdlib_texts(10), 400,
                                   300))


def test_long_document_is_cut_into_windows_every_tokenizer_fits(two_tokenizers):
    """A window holds at most seq_len tokens for EVERY tokenizer (BOS included), so all models read
    the same text; the windows put back together are the document."""
    seq = 120
    doc = stdlib_texts(13)[12][:6000] + "x" * 3000            # ends in a run with no place to cut
    windows = data.split_document(doc, two_tokenizers, seq)
    assert len(windows) > 3 and "".join(windows) == doc
    for w in windows:
        assert all(len(t.encode(w)) + (t.bos_id is not None) <= seq for t in two_tokenizers)
    assert data.split_document("short text", two_tokenizers, seq) == ["short text"]


class CharTokens:
    """A tokenizer with BOS that writes each character as one token, an upper-case letter as 4."""
    bos_id = 0

    def encode(self, text):
        return [1] * sum(4 if c.isupper() else 1 for c in text)


def test_windows_count_bos_when_they_fit_seq_len():
    """seq_len 8 with BOS leaves 7 text tokens. 'aaaaaaa' (7 tokens + BOS = 8) is one window;
    'aaaaaaaa' (8 + 1 = 9) must be cut. 'AAa' is 9 tokens: cut, and its 'AA' (8 tokens + BOS = 9)
    may not be a window: every window holds at most 7 text tokens. Catches BOS left out of the
    check that a whole document fits, and out of `fits` (a window of 8 text tokens + BOS)."""
    tok = CharTokens()
    assert data.fits("aaaaaaa", [tok], 8) == 0 and data.fits("AA", [tok], 8) == 1
    assert data.split_document("aaaaaaa", [tok], 8) == ["aaaaaaa"]
    for doc in ("aaaaaaaa", "AAa"):
        windows = data.split_document(doc, [tok], 8)
        assert len(windows) > 1 and "".join(windows) == doc
        assert all(len(tok.encode(w)) + 1 <= 8 for w in windows), windows


def test_a_window_is_cut_after_a_space_only_in_its_second_half():
    """'a ' + 30 'b's, one token a character, seq_len 11 (10 text tokens): the first window holds
    about 9 characters and has a space only at character 1, in its first half, so it is not cut
    there: a cut moves back to a space only within the window's second half, else windows could
    shrink to a word. 'abcdef ' + 20 'c's: whatever first guess of 7 to 10 characters, the space
    at character 6 is in its second half, and the window ends just after it: 'abcdef '. Catches
    the space searched from the window's start ('a ' alone), and the cut made before the space (the
    next window would start with it)."""
    tok = CharTokens()
    windows = data.split_document("a " + "b" * 30, [tok], 11)
    assert "".join(windows) == "a " + "b" * 30
    assert windows[0].startswith("a b") and len(windows[0]) >= 5
    assert all(len(w) + 1 <= 11 for w in windows)
    windows = data.split_document("abcdef " + "c" * 20, [tok], 11)
    assert windows[0] == "abcdef " and "".join(windows) == "abcdef " + "c" * 20


def test_quantised_logprobs_decode_within_half_a_step():
    """A log-prob is stored as one byte q, log p = -q / 16: decoding is within 1/32 nat of the
    model's, down to codes saturating at 255 (p < 1.2e-7); fp16 (--logprob-bits 16) is closer."""
    lp = np.concatenate([-np.random.default_rng(0).exponential(2.0, 10000), [0.0, -15.9]])
    lp = lp.astype(np.float32)
    q = storage.quantize_logprobs(lp, 8)
    assert q.dtype == np.uint8
    back = storage.dequantize_logprobs(q)
    fits = lp >= -255 / 16
    assert np.abs(back - lp)[fits].max() <= 1 / 32 + 1e-6
    assert (q[~fits] == 255).all() and (back[~fits] == -255 / 16).all()
    half = storage.dequantize_logprobs(storage.quantize_logprobs(lp, 16))
    assert np.abs(half - lp).max() <= 1e-2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A byte-level tokenizer of 512 tokens, an MPT model with 520 embedding rows (spare rows, as
    MPT checkpoints have), a two-document corpus, and the model's stored distributions."""
    root = tmp_path_factory.mktemp("tiny")
    texts = stdlib_texts(12)
    fusellm.save_model(mpt(520, 1), root / "model")
    byte_level_bpe(texts[:10], 512).save(str(root / "model" / "tokenizer.json"))
    with open(root / "corpus.jsonl", "w") as f:
        for t in texts[10:12]:
            f.write(json.dumps({"text": t[:1500]}) + "\n")
    data.build_windows(root / "corpus.jsonl", root / "model", [], root / "d", seq_len=150,
                       shard_windows=4, quiet=True)
    data.compute_dists(root / "d", root / "model", "target", topk=5, batch_size=3, quiet=True)
    return root


def test_stored_topk_and_ce_are_the_models(tiny_data):
    """At each of a window's tokens the stored top-K is the model's own top-K next tokens, its
    log-probs normalised over the tokenizer's vocabulary (not the checkpoint's spare rows), and the
    stored CE is the model's mean -log p of each token given what precedes it."""
    model, tok = fusellm.load(tiny_data / "model")
    win = storage.read_windows(tiny_data / "d", 0)[1]
    stored = storage.read_dists(tiny_data / "d", "target", 0)
    a, b = stored["offsets"][1], stored["offsets"][2]
    ids = tok.encode(win["text"])
    with torch.no_grad():
        logits = model(torch.tensor([[*([tok.bos_id] if tok.bos_id is not None else []), *ids]]))[0]
    assert logits.shape[-1] == 520 and tok.vocab_size == 512    # normalise over the tokenizer's
    logp = logits[:, :tok.vocab_size].log_softmax(-1)
    nb = int(tok.bos_id is not None)
    top = logp[nb:].topk(5)
    assert (stored["topk_ids"][a:b] == top.indices.numpy()).all()
    lps = storage.dequantize_logprobs(stored["topk_logprobs"][a:b])
    assert np.abs(lps - top.values.numpy()).max() <= 1 / 32 + 1e-6
    ce = -logp[:-1].gather(1, torch.tensor(ids[1 - nb:] if nb == 0 else ids)[:, None]).mean()
    assert abs(stored["ce"][1] - float(ce)) < 1e-4


@pytest.mark.parametrize("blocks", ["whole", "positions", "positions x vocabulary"])
def test_the_head_in_blocks_gives_the_full_computation(two_tokenizers, blocks):
    """window_topk runs the output head on a block of positions x vocabulary at a time
    (extras/fast_head.py), never building (B, T, V): the default block, 3 positions (windows cut
    mid-way) by the whole vocabulary, or by a third of it plus one (so the last block is short).
    Its top-K, log-probs and CE equal the whole-batch log_softmax + topk written here. Catches a
    block boundary that drops or repeats a position, a log-sum-exp taken over a block instead of the
    vocabulary, a block's top-K ids not shifted by the block's start, the next token's logit read
    from the wrong block, and the CE read one position off."""
    tok = two_tokenizers[0]                            # sentencepiece: BOS first
    model = llama(tok.vocab_size, 0).eval()
    batch = [tok.encode(t[:300]) for t in stdlib_texts(3)]
    V = tok.vocab_size
    if blocks == "whole":
        ids, lps, ces = data.window_topk(model, tok, batch, 5, "cpu")
    else:
        cols = V if blocks == "positions" else V // 3 + 1
        ids, lps, ces = data.window_topk(model, tok, batch, 5, "cpu", head_elements=3 * cols,
                                         head_cols=cols)
    for toks, i_, l_, ce in zip(batch, ids, lps, ces):
        s = [tok.bos_id] + toks
        with torch.no_grad():
            logp = model(torch.tensor([s]))[0, :, :V].log_softmax(-1)           # (n+1, V)
        top = logp[1:].topk(5, dim=-1)                                         # at each text token
        assert np.array_equal(i_, top.indices.numpy())
        assert np.allclose(l_, top.values.numpy(), atol=1e-5)
        want = -logp[:-1].gather(-1, torch.tensor(s[1:])[:, None]).mean()
        assert abs(ce - float(want)) < 1e-5


class RandomHead:
    """An output head of random weights, with the model's `logits(h, vocab slice)`."""

    def __init__(self, C, V, seed):
        self.w = torch.randn(V, C, generator=torch.Generator().manual_seed(seed)) * 3

    def logits(self, h, vocab=slice(None), fp32=True):                 # fp32 weights: fp32 always
        return h @ self.w[vocab].T


@pytest.mark.parametrize("rows, cols", [(7, 1000), (2**20, 333), (1, 64), (50, 1)])
def test_the_fast_head_equals_the_readable_head(rows, cols):
    """extras/fast_head.py head_topk (blocks of positions x vocabulary, a running log-sum-exp and
    top-K) gives data.head_topk's top-K ids, log-probs and next-token log-probs on random hidden
    states, whatever the block shape; a position with no next token (-1) scores 0."""
    N, C, V, K = 23, 16, 1000, 7
    model = RandomHead(C, V, seed=rows)
    h = torch.randn(N, C, generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    nxt[-1] = -1
    want = data.head_topk(model, h, nxt, K, V)
    got = fast_head.head_topk(model, h, nxt, K, V, head_elements=rows * cols, head_cols=cols)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-4) and torch.allclose(got[2], want[2], atol=1e-4)
    assert got[2][-1] == 0 and want[2][-1] == 0


class IdentityHead:
    """An output head whose logits are the hidden states themselves: h (N, 4) -> z = h, so a test
    writes the logits it wants. 4 rows: the tokenizer's 3 ids and one spare row of the
    checkpoint."""

    def logits(self, h, vocab=slice(None), fp32=True):
        return h[:, vocab].clone()                  # a copy: the fast head overwrites its logits


@pytest.mark.parametrize("head_elements, cols", [(0, 0), (2, 2), (1, 2)],
                         ids=["one block", "1 x 2 blocks", "a block smaller than a row"])
def test_both_heads_on_logits_worked_by_hand(head_elements, cols):
    """Three positions, logits chosen so that the probabilities over the tokenizer's 3 ids are
    eighths and ninths (the spare 4th row's logit, 10, is no token and is left out):
        z = ln [4, 1, 3] -> p = [1/2, 1/8, 3/8], next token 0 (the first id, the first block's
                                                                first entry)
        z = ln [1, 6, 2] -> p = [1/9, 6/9, 2/9], next token 2 (the last, short block of 1)
        z = ln [5, 2, 1] -> p = [5/8, 2/8, 1/8], no next token (-1): 0.
    Both heads (data.head_topk whole, fast_head.head_topk in blocks of `cols` ids; a block of 1
    element is smaller than a row and must still hold one position) give these top-2 ids and
    log-probs and next-token log-probs. Catches a next token of id 0 scored 0 as if it were "none"
    (`* (nxt > 0)`), the spare row counted in the normaliser, and a block of 0 positions (rows =
    head_elements // cols with no floor of 1: range() with step 0)."""
    ln = torch.tensor([[4, 1, 3], [1, 6, 2], [5, 2, 1]], dtype=torch.float32).log()
    h = torch.cat([ln, torch.full((3, 1), 10.0)], 1)                       # (3, 4): a spare row
    nxt = torch.tensor([0, 2, -1])
    want_ids = torch.tensor([[0, 2], [1, 2], [0, 1]])
    want_lps = torch.tensor([[1 / 2, 3 / 8], [6 / 9, 2 / 9], [5 / 8, 2 / 8]]).log()
    want_label = torch.tensor([1 / 2, 2 / 9, 1.0]).log()                    # ln 1 = 0: no next
    assert fast_head.block_shape(3, False, head_elements, cols)[0] >= 1
    for ids, lps, label in (data.head_topk(IdentityHead(), h, nxt, 2, 3),
                            fast_head.head_topk(IdentityHead(), h, nxt, 2, 3, head_elements,
                                                cols)):
        assert torch.equal(ids, want_ids)
        assert torch.allclose(lps, want_lps, atol=1e-6)
        assert torch.allclose(label, want_label, atol=1e-6)


def test_aligned_entries_are_padded_rows_read_back_with_a_mask():
    """An aligned source carries 0 (fallback) to K entries onto each target token, stored as padded
    rows: counts [2, 0, 1] put entries a, b in row 0, nothing in row 1 and c in row 2, each row
    filled up with 0. A row's entries are its first counts: the mask arange(K) < counts. `padded`
    writes a transfer in that form; fusellm.collate keeps the masked entries and gives the rest
    log-prob -inf, and the count-0 row falls back to the one-hot."""
    tr = align.Transferred(offsets=np.array([0, 2, 2, 3]), ids=np.array([7, 9, 4]),
                           logprobs=np.array([-0.1, -2.5, -0.5], dtype=np.float32),
                           fallback=np.array([False, True, False]), onehot=np.array([-1, 5, -1]),
                           matched=np.array([0, -1, 1]))
    stored = data.padded(tr, 2)
    assert stored["counts"].tolist() == [2, 0, 1]
    assert stored["ids"].tolist() == [[7, 9], [0, 0], [4, 0]]
    assert (stored["logprobs"] == np.float32([[-0.1, -2.5], [0, 0], [-0.5, 0]])).all()
    mask = np.arange(2) < stored["counts"][:, None]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    # collate: a window of 4 target tokens (rows 0..2 used, row 3 predicts past it), BOS 1
    item = {"tokens": [3, 5, 4, 6], "target": {"topk_ids": np.zeros((4, 2), dtype=np.int64),
                                               "topk_logprobs": np.zeros((4, 2)), "ce": 1.0},
            "sources": {"s": {"counts": np.append(stored["counts"], 0),
                              "ids": np.vstack([stored["ids"], [0, 0]]),
                              "logprobs": np.vstack([stored["logprobs"], [0, 0]]), "ce": 2.0}}}
    b = fusellm.collate([item], ["target", "s"], 1, 2)
    lp = b.cand_logprobs[1, 0, 1:4]                              # rows 0..2 at positions 1..3
    assert b.cand_ids[1, 0, 1:4].tolist() == [[7, 9], [0, 0], [4, 0]]
    assert torch.allclose(lp[0], torch.tensor([-0.1, -2.5])) and lp[2, 0] == -0.5
    assert torch.isinf(lp[1]).all() and lp[2, 1] == -np.inf            # no entry: -inf
    assert b.cand_fallback[1, 0].tolist() == [False, False, True, False]


def test_ids_of_a_large_vocabulary_come_back_unchanged(tmp_path):
    """Gemma 3's vocabulary has 262,144 ids, more than uint16's 65,536, so its stored ids need 32
    bits. Ids on both sides of the uint16 edge (65,535 and 65,536) and the last id (262,143) are
    saved as a model's top-K (save_dists) and as a source's aligned rows (save_aligned), and read
    back the way data.FusionData reads them (read_dists + window_rows, read_aligned +
    aligned_window): the same ids, log-probs and counts. Catches ids stored as uint16 whatever the
    vocabulary (65,536 would come back as 0, 70,000 as 4,464, 262,143 as 65,535)."""
    V = 262_144
    ids = [np.array([[0, 65_535, 65_536], [70_000, 131_071, 262_143]]),     # window 0: 2 tokens
           np.array([[262_143, 65_536, 1]])]                                # window 1: 1 token
    lps = [np.float32([[-0.5, -1.0, -2.0], [-0.25, -3.0, -4.0]]),   # multiples of 1/16: exact
           np.float32([[-0.0625, -1.5, -8.0]])]
    out = tmp_path / "d"
    (out / "models" / "src").mkdir(parents=True)
    (out / "aligned" / "src").mkdir(parents=True)
    windows = [([5, 6], ids[0], lps[0], 1.5), ([7], ids[1], lps[1], 2.5)]
    storage.save_dists(out / "models" / "src" / "shard-00000.npz", windows, V, 8)
    stored = storage.read_dists(out, "src", 0)
    for w in (0, 1):
        i_, l_ = storage.window_rows(stored, w)
        assert i_.tolist() == ids[w].tolist() and l_.tolist() == lps[w].tolist()
    rows = [{"counts": np.array([3, 2]), "ids": ids[0], "logprobs": lps[0]},
            {"counts": np.array([3]), "ids": ids[1], "logprobs": lps[1]}]
    target_offsets = np.array([0, 2, 3])
    storage.save_aligned(out / "aligned" / "src" / "shard-00000.npz", rows, V,
                         np.float32([1.5, 2.5]), target_offsets)
    z = storage.read_aligned(out, "src", 0)
    for w, n_src in ((0, 2), (1, 1)):
        got, n = storage.aligned_window(z, target_offsets, w)
        assert got["ids"].tolist() == ids[w].tolist() and n == n_src
        assert got["logprobs"].tolist() == lps[w].tolist()
        assert got["counts"].tolist() == rows[w]["counts"].tolist()


def test_both_heads_are_exact_where_logits_pass_the_range_of_exp():
    """exp overflows float32 above 88.7, and a head's logits can pass it (the largest here are
    230 to 414). Both heads take the log-sum-exp as max + log sum exp(z - max), so their top-K
    ids, log-probs and next-token log-probs are finite and equal a float64 log_softmax of the same
    logits worked here, in one block or in blocks of 4 positions x 300 entries (the last one short).
    Catches the fast head's block log-sum-exp taken as log sum exp(z) without the block's maximum
    (inf, so every log-prob -inf, the moment one logit passes 88.7)."""
    N, C, V, K = 9, 16, 1000, 5
    model = RandomHead(C, V, seed=3)
    h = torch.randn(N, C, generator=torch.Generator().manual_seed(4)) * 8
    z = h.double() @ model.w.double().T                                     # (N, V) in float64
    assert z.max(-1).values.min() > 100                  # every position's top logit past 88.7
    logp = z.log_softmax(-1)
    top = logp.topk(K, dim=-1)
    nxt = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    nxt[-1] = -1                                                          # no next token: 0
    want_label = logp.gather(1, nxt.clamp(min=0)[:, None])[:, 0] * (nxt >= 0)
    for ids, lps, label in (data.head_topk(model, h, nxt, K, V),
                            fast_head.head_topk(model, h, nxt, K, V),
                            fast_head.head_topk(model, h, nxt, K, V, head_elements=4 * 300,
                                                head_cols=300)):
        assert torch.isfinite(lps).all() and torch.isfinite(label).all()
        assert torch.equal(ids, top.indices)
        # float32 logits of a few hundred carry rounding of ~1e-4 (1.2e-4 at most here)
        assert torch.allclose(lps.double(), top.values, atol=1e-3)
        assert torch.allclose(label.double(), want_label, atol=1e-3)
