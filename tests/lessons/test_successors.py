"""FuseLLM's successors as other distances between the fused P_t and the target's Q_t
(extras/successors.py, train.py --fusion-loss): ULD's sorted L1, GOLD's hybrid of soft CE on exact
tokens and sorted L1 on the rest, X-Token's prefix projection. Each is worked by hand on a
vocabulary of five or six ids, checked against a dense brute-force version on random inputs (its
values and its gradients), and its table is built by hand. A short training run with each:
test_train.py."""
import math

import pytest
import torch

import train
from extras import successors as su


def logits_of(q):
    """Logits whose softmax is q: log q (softmax of log q is q when q sums to 1)."""
    return torch.tensor(q).log()[None, None]                          # (1, 1, V)


def sparse(ids, probs):
    return torch.tensor(ids)[None, None], torch.tensor(probs)[None, None]     # (1, 1, E) each


def test_uld_by_hand():
    """ULD compares sorted values. P_t has ids [2, 0, 2, 1] with probs [0.15, 0.5, 0.15, 0.2]: id 2
    twice, so P_t is {0: 0.5, 2: 0.3, 1: 0.2}, sorted [0.5, 0.3, 0.2, 0] (E = 4 ranks). Q_t over 5
    ids is [0.05, 0.1, 0.15, 0.2, 0.5]: its top 4 sorted [0.5, 0.2, 0.15, 0.1], and 0.05 past them.
        ranks 1-4: |0.5-0.5| + |0.3-0.2| + |0.2-0.15| + |0-0.1| = 0 + 0.1 + 0.05 + 0.1 = 0.25
        tail (P_t: 0 there): 1 - 0.95                                                   = 0.05
        ULD                                                                             = 0.30
    Catches: the repeated id not added up (sorted [0.5, 0.2, 0.15, 0.15] gives 0.10), P_t not
    sorted ([0.3, 0.5, 0, 0.2] gives 0.80), the tail left out (0.25)."""
    ids, probs = sparse([2, 0, 2, 1], [0.15, 0.5, 0.15, 0.2])
    got = su.uld(logits_of([0.05, 0.1, 0.15, 0.2, 0.5]), ids, probs)
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(0.30, abs=1e-6)


def test_gold_by_hand():
    """GOLD: ids 0 and 3 are exact (their text is a token of every source), 1, 2 and 4 are not.
    P_t: ids [0, 2, 1, 2], probs [0.4, 0.2, 0.3, 0.1]; Q_t = [0.1, 0.2, 0.3, 0.25, 0.15].
        exact part, soft CE on id 0:            -0.4 ln 0.1 = 0.4 x 2.302585        = 0.921034
        the rest, P_t on ids 1, 2: {1: 0.3, 2: 0.3}, sorted  [0.3, 0.3, 0,    0]
                  Q_t on ids 1, 2, 4,           sorted       [0.3, 0.2, 0.15, 0]  (no tail)
                  sorted L1: 0 + 0.1 + 0.15 + 0                                      = 0.25
        GOLD                                                                         = 1.171034
    Catches a wrong mask: with no id exact it is plain ULD (0.5); with the mask ignored in Q_t
    (id 3's 0.25 among the rest: [0.3, 0.25, 0.2, 0.15], 0.1 past them) 0.5 + 0.921 = 1.421."""
    exact = torch.tensor([True, False, False, True, False])
    ids, probs = sparse([0, 2, 1, 2], [0.4, 0.2, 0.3, 0.1])
    got = su.gold(logits_of([0.1, 0.2, 0.3, 0.25, 0.15]), ids, probs, exact)
    assert float(got) == pytest.approx(0.4 * math.log(10) + 0.25, abs=1e-6)
    assert float(got) == pytest.approx(1.171034, abs=1e-6)


def test_xtoken_by_hand():
    """X-Token's projection: the target's vocabulary is a, ab, abc, b, (a control token, no text),
    bc. Each token's prefixes that are tokens, itself included:
        a: {a}   ab: {a, ab}   abc: {a, ab, abc}   b: {b}   control: {itself}   bc: {b, bc}
    P_t: abc 0.5, bc 0.3, a 0.2. Q_t = [0.1, 0.2, 0.3, 0.1, 0.05, 0.25] over the six ids.
        projected Q_t:  abc 0.1 + 0.2 + 0.3 = 0.6,   bc 0.1 + 0.25 = 0.35,   a 0.1
        L = -(0.5 ln 0.6 + 0.3 ln 0.35 + 0.2 ln 0.1)
          = 0.5 x 0.510826 + 0.3 x 1.049822 + 0.2 x 2.302585 = 0.255413 + 0.314947 + 0.460517
          = 1.030877
    Catches the prefix sum left out (each entry scored on Q_t(t) alone: 0.5 ln(1/0.3) + ... =
    1.478), or a prefix table that misses the token itself."""
    table = su.prefix_table(["a", "ab", "abc", "b", "", "bc"])
    assert table.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2], [3, -1, -1], [4, -1, -1],
                              [3, 5, -1]]
    ids, probs = sparse([2, 5, 0], [0.5, 0.3, 0.2])
    got = su.xtoken(logits_of([0.1, 0.2, 0.3, 0.1, 0.05, 0.25]), ids, probs, table)
    assert float(got) == pytest.approx(1.030877, abs=1e-6)


def test_exact_mask_by_hand():
    """An id is exact when its text is a token of every source: 'a' is in both, '▁x' in both, 'ab'
    only in the second, '' (a control token) never counts. Catches 'any source' for 'every source'
    (would make 'ab' exact) and control tokens matching each other."""
    sources = [["a", "\u2581x", ""], ["\u2581x", "ab", "a", ""]]
    got = su.exact_mask(["a", "ab", "\u2581x", ""], sources)
    assert got.tolist() == [True, False, True, False]
    assert su.exact_mask(["a", ""], []).tolist() == [True, False]      # no source: every text


# --- against dense brute-force versions, written here from the formulas, on random inputs ---

def random_case(V, E, seed):
    """logits (2, 3, V) needing grad; a sparse P_t (2, 3, E) with repeated ids and zero entries,
    summing to 1 at each position, as fusellm.fuse gives; the dense P_t (2, 3, V)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, V, generator=g).mul(2).requires_grad_()
    ids = torch.randint(0, V, (2, 3, E), generator=g)
    probs = torch.rand(2, 3, E, generator=g) * (torch.rand(2, 3, E, generator=g) > 0.3)
    probs[..., 0] += 0.1                                                # no all-zero row
    probs = probs / probs.sum(-1, keepdim=True)
    dense = torch.zeros(2, 3, V).scatter_add_(-1, ids, probs)
    return logits, ids, probs, dense


def dense_sorted_l1(p, q):
    """Sort every value over the whole vocabulary and take the L1 distance, rank by rank."""
    return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)


def dense_xtoken(logits, dense, vocab):
    V = len(vocab)
    A = torch.tensor([[float(u == t or (vocab[u] != "" and vocab[t].startswith(vocab[u])))
                       for u in range(V)] for t in range(V)])          # (V, V): u a prefix of t
    projected = torch.softmax(logits, -1) @ A.T                         # (B, T, V)
    return -(dense * projected.log()).sum(-1)


VOCAB = ["a", "ab", "b", "", "ba", "abb", "a", "bab", "c"]           # 9 ids; 'a' twice, as happens


@pytest.mark.parametrize("loss", ["uld", "gold", "xtoken"])
@pytest.mark.parametrize("V,E", [(9, 4), (9, 12)])                    # E past V: padding
def test_each_loss_equals_its_dense_brute_force_values_and_gradients(loss, V, E):
    """The sparse loss (top-E of Q_t, a tail sum, merged repeats, a prefix table) against the same
    formula computed densely over the whole vocabulary: the values, and the gradients with respect
    to the logits. Catches a rank misaligned by the padding, a repeat counted twice, a tail
    dropped, a prefix missed, and a gradient cut (a detach, an argmax)."""
    for seed in range(3):
        logits, ids, probs, dense = random_case(V, E, seed)
        exact = torch.tensor([True, False, True, False, True, False, True, False, False])
        q = torch.softmax(logits, -1)
        if loss == "uld":
            got, want = su.uld(logits, ids, probs), dense_sorted_l1(dense, q)
        elif loss == "gold":
            got = su.gold(logits, ids, probs, exact)
            want = (-(dense * exact * torch.log_softmax(logits, -1)).sum(-1)
                    + dense_sorted_l1(dense * ~exact, q * ~exact))
        else:
            got = su.xtoken(logits, ids, probs, su.prefix_table(VOCAB))
            want = dense_xtoken(logits, dense, VOCAB)
        assert got.shape == (2, 3)
        assert torch.allclose(got, want, atol=1e-5), (got, want)
        g_got, = torch.autograd.grad(got.sum(), logits)
        g_want, = torch.autograd.grad(want.sum(), logits)
        assert g_got.abs().sum() > 0 and torch.isfinite(g_got).all()
        assert torch.allclose(g_got, g_want, atol=1e-5)


def test_a_bad_fusion_loss_is_refused_before_anything_loads(tmp_path):
    """A typo in --fusion-loss ends with one line naming the value and the choices, before the data
    or the target are read (neither exists here, so reaching them would give another error)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "none"), "--target", str(tmp_path / "none"),
                    "--fusion-loss", "kl"])
    assert str(e.value) == ("error: --fusion-loss 'kl': choose one of ce, uld, gold, xtoken "
                            "(docs/training.md)")
