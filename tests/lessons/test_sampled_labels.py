"""Sampled labels, the Random Sampling KD lesson (Anshumann et al., "Sparse Logit Sampling", ACL
2025; `python data.py dists --sample N`, extras/sampled_labels.py): instead of a model's top-K, N
ids drawn with replacement from its whole next-token distribution p, each weighing 1/N. Drawn by
inverse CDF (a uniform u picks the first id whose cumulative probability passes u), worked by hand
here; the blocked sampler equals the readable one; p_hat = count / N is unbiased for p and so is the
soft cross-entropy against it, where the renormalised top-K is biased."""
import json
import math

import numpy as np
import torch

import data
import fusellm
from conftest import llama, stdlib_texts, trained_tokenizers
from extras import fast_head, sampled_labels, storage

P = [0.5, 0.3, 0.15, 0.05]          # the hand-worked distribution over 4 ids; CDF .5 .8 .95 1


class FixedHead:
    """An output head whose next-token distribution is the same at every position: logits log p
    (shifted by 3, which softmax undoes), whatever the hidden state."""

    def __init__(self, p):
        self.z = torch.log(torch.tensor(p, dtype=torch.float32)) + 3

    def logits(self, h, vocab=slice(None)):
        return self.z[vocab].expand(len(h), -1)


class RandomHead:
    """An output head of random weights, with the model's `logits(h, vocab slice)`."""

    def __init__(self, C, V, seed):
        self.w = torch.randn(V, C, generator=torch.Generator().manual_seed(seed)) * 3

    def logits(self, h, vocab=slice(None)):
        return h @ self.w[vocab].T


def test_hand_chosen_uniforms_give_the_hand_derived_ids():
    """p = [0.5, 0.3, 0.15, 0.05] has the CDF [0.5, 0.8, 0.95, 1.0]; a uniform takes the first id
    whose CDF passes it: 0.1 -> 0, 0.55 -> 1, 0.79 -> 1, 0.81 -> 2, 0.97 -> 3. Each of the 5 draws
    weighs 1/5 (log-prob -log 5), and the next token's log-prob is exact (log 0.15 for id 2; 0
    where there is none). The same from the readable sampler and the blocked one, in blocks of 1, 2
    and 3 ids (the CDF carried from block to block). Catches a CDF crossing taken one id off (the
    last id whose CDF is below u), or a block's ids not shifted by the block's start."""
    u = torch.tensor([[0.1, 0.55, 0.79, 0.81, 0.97]] * 2, dtype=torch.float64)   # (2, 5) sorted
    nxt = torch.tensor([2, -1])
    h = torch.zeros(2, 1)
    results = [sampled_labels.sample_reference(FixedHead(P), h, nxt, u, 4)]
    results += [fast_head.head_topk(FixedHead(P), h, nxt, 0, 4, cols, cols, u)
                for cols in (1, 2, 3)]
    for ids, logprobs, label in results:
        assert ids.tolist() == [[0, 1, 1, 2, 3]] * 2
        assert torch.allclose(logprobs, torch.full((2, 5), -math.log(5)))
        assert abs(float(label[0]) - math.log(0.15)) < 1e-6 and float(label[1]) == 0.0


def test_a_uniform_past_the_cdf_takes_the_last_id_of_nonzero_probability():
    """p = [0.6, 0.3, 0.1, 0, 0]: ids 3 and 4 (say, reserved tokens) have probability 0. In float64
    the CDF's last value is 0.6 + 0.3 + 0.1 = 1 - 2^-53, the largest number below 1, which is also
    the largest uniform torch.rand draws: that uniform passes no CDF value (first cdf > u: none).
    It must take id 2, the last with p > 0; 0.1 -> 0 and 1 - 1e-15 -> 2 as usual. The same from
    the readable sampler and the blocked one in blocks of 1, 2, 3 and 5 ids. Catches such a uniform
    sent to the vocabulary's last id (4, probability 0), as the samplers did."""
    top = 1 - 2**-53
    h, nxt, head = torch.zeros(1, 1), torch.tensor([-1]), FixedHead([0.6, 0.3, 0.1, 0.0, 0.0])
    cdf = torch.log_softmax(head.logits(h).double(), dim=-1).exp().cumsum(dim=-1)    # (1, 5)
    assert float(cdf[0, -1]) == top                                 # the case under test
    u = torch.tensor([[0.1, 1 - 1e-15, top]], dtype=torch.float64)             # (1, 3) sorted
    results = [sampled_labels.sample_reference(head, h, nxt, u, 5)]
    results += [fast_head.head_topk(head, h, nxt, 0, 5, cols, cols, u) for cols in (1, 2, 3, 5)]
    for ids, _, _ in results:
        assert ids.tolist() == [[0, 2, 2]]


def test_the_blocked_sampler_equals_the_readable_one():
    """head_sample walks the vocabulary in blocks twice (log-sum-exp, then the CDF), never building
    (N, V); given the same uniforms it draws the same ids as sample_reference (softmax, cumsum,
    searchsorted over the whole vocabulary) on a random head, whatever the block shape (whole rows,
    333 ids with a short last block, 64, one id at a time), with the same next-token log-probs.
    Catches a block's CDF not starting where the previous one ended, a uniform placed twice (in its
    block and again in a later one), or a log-sum-exp over a block instead of the vocabulary."""
    N, C, V, S = 40, 16, 1000, 12
    model = RandomHead(C, V, seed=0)
    h = torch.randn(N, C, generator=torch.Generator().manual_seed(1)) * 0.3
    nxt = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    nxt[-1] = -1
    u = sampled_labels.uniforms([list(range(N))], S, "random head")              # (N, S)
    want = sampled_labels.sample_reference(model, h, nxt, u, V)
    assert len(set(want[0].flatten().tolist())) > 100           # spread over the vocabulary
    for rows, cols in [(7, V), (N, 333), (1, 64), (50, 1)]:
        got = fast_head.head_topk(model, h, nxt, 5, V, rows * cols, cols, u)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.allclose(got[2], want[2], atol=1e-5)


def test_draws_are_seeded_by_the_window_not_the_batch(tmp_path):
    """data.window_topk(sample=12) on a tiny Llama: each window's ids are sample_reference's on the
    model's own hidden states with that window's uniforms (BOS's row dropped, as for the top-K),
    in ascending order, and the same whichever batch the window is in (alone, or after another):
    the generator is seeded by the window's tokens and the model's name, never its place. The CE
    is the top-K path's (exact). Catches uniforms drawn for the batch (a window's ids would change
    with its neighbours) or rows taken one position off."""
    tok = trained_tokenizers(tmp_path, stdlib_texts(10), 400, 300)[0]          # BOS first
    model = llama(tok.vocab_size, 0).eval()
    a, b = (tok.encode(t[:200]) for t in stdlib_texts(2))
    ids_ab, lps_ab, ces_ab = data.window_topk(model, tok, [a, b], 5, "cpu", sample=12, seed="m")
    ids_b, _, ces_b = data.window_topk(model, tok, [b], 5, "cpu", sample=12, seed="m")
    _, _, ces_topk = data.window_topk(model, tok, [a, b], 5, "cpu")
    assert np.array_equal(ids_ab[1], ids_b[0]) and abs(ces_ab[1] - ces_b[0]) < 1e-6
    assert np.allclose(ces_ab, ces_topk, atol=1e-5)
    s = [tok.bos_id] + a
    with torch.no_grad():
        h = model.hidden(torch.tensor([s]))[0]                                  # (n+1, C)
    u = sampled_labels.uniforms([s], 12, "m")
    want, _, _ = sampled_labels.sample_reference(model, h, torch.tensor(s[1:] + [-1]), u,
                                                 tok.vocab_size)
    assert ids_ab[0].shape == (len(a), 12) and np.array_equal(ids_ab[0], want[1:].numpy())
    assert (np.diff(ids_ab[0], axis=1) >= 0).all()
    assert np.allclose(lps_ab[0], -math.log(12))
    other, _, _ = data.window_topk(model, tok, [a], 5, "cpu", sample=12, seed="another model")
    assert not np.array_equal(other[0], ids_ab[0])


def draws(R: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R positions of FixedHead(P), N draws each, by the blocked sampler: ids and log-probs
    (R, N)."""
    u = sampled_labels.uniforms([list(range(R))], N, "unbiased")
    h, nxt = torch.zeros(R, 1), torch.full((R,), -1)
    return fast_head.head_topk(FixedHead(P), h, nxt, 0, 4, 2 * 1024, 2, u)[:2]


def rows_batch(ids, logprobs) -> fusellm.Batch:
    """R positions' rows (R, E) as one candidate of one window, for fusellm.candidate_dists."""
    R = len(ids)
    return fusellm.Batch(input_ids=torch.zeros(1, R, dtype=torch.long),
                         labels=torch.zeros(1, R, dtype=torch.long),
                         cand_ids=ids[None, None], cand_logprobs=logprobs[None, None],
                         cand_fallback=torch.zeros(1, 1, R, dtype=torch.bool))


def top2_rows():
    """FixedHead(P)'s top-2 at one position by data.head_topk: ids and log-probs (1, 2)."""
    ids, logprobs, _ = data.head_topk(FixedHead(P), torch.zeros(1, 1), torch.tensor([-1]), 2, 4)
    return ids, logprobs


def test_sampled_labels_are_unbiased_and_the_top_k_is_not():
    """p_hat(v) = count(v) / N is a binomial count over N: mean p(v), variance p(v)(1 - p(v)) / N.
    Averaged over R = 4000 positions (independent draws) its standard deviation is
    sqrt(p(1 - p) / (N R)), 0.0023 for p = 0.5 at N = 12; the mean of p_hat is within 5 of them of
    p for every id. The top-2 (data.head_topk) renormalised by fusellm.candidate_dists is
    [0.5, 0.3] / 0.8 = [0.625, 0.375, 0, 0] at every position: 0.125 off on id 0, 50 standard
    deviations. Catches draws that are not distributed as p (e.g. uniforms not uniform, or the CDF
    crossing one id off), which the equality tests cannot see."""
    R, N = 4000, 12
    ids, _ = draws(R, N)
    p_hat = torch.stack([(ids == v).double().mean(dim=1) for v in range(4)], dim=1)   # (R, 4)
    p = torch.tensor(P, dtype=torch.float64)
    bound = 5 * torch.sqrt(p * (1 - p) / (N * R))                   # 5 standard deviations
    assert ((p_hat.mean(dim=0) - p).abs() <= bound).all(), (p_hat.mean(dim=0), bound)
    ids2, logprobs2 = top2_rows()                                           # (1, 2) each
    _, probs2 = fusellm.candidate_dists(rows_batch(ids2, logprobs2))         # (1, 1, 1, 3)
    top2 = torch.zeros(4, dtype=torch.float64).index_add_(0, ids2[0], probs2[0, 0, 0, :2].double())
    assert torch.allclose(top2, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=1e-6)
    assert ((top2 - p).abs() > 10 * bound).any()


def test_the_soft_cross_entropy_is_unbiased_through_fusellm():
    """The target's q = [0.1, 0.2, 0.3, 0.4] scored against the sampler's rows (N entries of
    log-prob -log N, repeats kept) by fusellm's own candidate_dists + token_losses, at temperature 1
    and 0.5 (equal log-probs stay equal). The true CE, -sum_v p(v) log q(v) = -(0.5 log 0.1 +
    0.3 log 0.2 + 0.15 log 0.3 + 0.05 log 0.4) = 1.8605, is the mean over R positions within 5
    standard deviations, sqrt(Var_p[log q] / (N R)) = 0.0022 (one draw's variance, 0.2259, over N
    draws and R positions). Against the top-2 (data.head_topk) renormalised by the same code,
    -(0.625 log 0.1 + 0.375 log 0.2) = 2.0426, 0.18 off. Catches repeated draws merged into one
    entry (a repeated id's weight lost), or each draw stored with the model's log-prob of its id
    (renormalised, a repeated likely id would count p(v) times its count: biased)."""
    R, N = 4000, 12
    ids, logprobs = draws(R, N)                                         # (R, N) each
    logq = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    batch = rows_batch(ids, logprobs)
    for temperature in (1.0, 0.5):
        lab_ids, probs = fusellm.candidate_dists(batch, temperature)           # (1, 1, R, N+1)
        _, ce = fusellm.token_losses(logq.expand(1, R, 4), batch.labels, lab_ids[0], probs[0])
        p, lq = torch.tensor(P, dtype=torch.float64), logq.double()
        true_ce = float(-(p * lq).sum())
        assert abs(true_ce - 1.8605) < 1e-4                                      # worked above
        sd = math.sqrt(float((p * lq**2).sum() - (p * lq).sum() ** 2) / (N * R))
        assert abs(float(ce.mean()) - true_ce) < 5 * sd, (float(ce.mean()), true_ce, sd)
    top2 = rows_batch(*top2_rows())                       # data.head_topk's top-2, one position
    lab_ids, probs = fusellm.candidate_dists(top2)                              # (1, 1, 1, 3)
    _, top2_ce = fusellm.token_losses(logq.expand(1, 1, 4), top2.labels, lab_ids[0], probs[0])
    assert abs(float(top2_ce) - 2.0426) < 1e-4 and abs(float(top2_ce) - true_ce) > 50 * sd


def test_merged_draws_keep_their_counts_when_aligned_rows_are_stored(tmp_path):
    """A sampled source's draws merged onto one target id by alignment (merge "sum") are stored as
    log(c/N): with N = 12, a target token whose entries got 1 and 11 draws holds
    [log(1/12), log(11/12)], which training renormalises to [1/12, 11/12] = [0.0833, 0.9167]. Saved
    by storage.save_aligned into a data folder whose source's info.json says --sample 12, then read
    back as FusionData does, they come back within 0.1% (fp16); a top-K source's rows keep uint8
    codes (1/16 nat). Catches aligned rows stored as uint8 whatever the labels: log(1/12) = -2.485
    becomes -2.5 and log(11/12) = -0.087 becomes -0.0625, renormalised 0.0804 and 0.9196."""
    out = tmp_path / "d"
    for name, sample in (("sampled", 12), ("topk", 0)):
        (out / "aligned" / name).mkdir(parents=True)
        (out / "models" / name).mkdir(parents=True)
        (out / "models" / name / "info.json").write_text(
            json.dumps({"model": "m", "tokenizer": "t", "topk": 12, "sample": sample}))
        storage.save_dists(out / "models" / name / "shard-00000.npz",      # its own: 1 token
                           [([5], np.zeros((1, 12)), np.zeros((1, 12)), 1.5)], 100, 8)
        row = {"counts": np.array([2]), "ids": np.array([[3, 7] + [0] * 10]),
               "logprobs": np.float32([[math.log(1 / 12), math.log(11 / 12)] + [0] * 10])}
        storage.save_aligned(out / "aligned" / name / "shard-00000.npz", [row], 100,
                             np.float32([1.5]), np.array([0, 1]))
    z = storage.read_aligned(out, "sampled", 0)
    got, _ = storage.aligned_window(z, np.array([0, 1]), 0)
    p = np.exp(got["logprobs"][0, :2]) / np.exp(got["logprobs"][0, :2]).sum()
    assert np.allclose(p, [1 / 12, 11 / 12], rtol=1e-3), p
    assert storage.read_aligned(out, "topk", 0)["logprobs"].dtype == np.uint8
