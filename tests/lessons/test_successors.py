"""FuseLLM's successors as other distances between the fused P_t and the target's Q_t
(extras/successors.py, train.py --fusion-loss): ULD's sorted L1, GOLD's hybrid of soft CE on exact
tokens and sorted L1 on the rest, X-Token's prefix projection of P_t. Each is worked by hand on a
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


def test_merged_adds_up_repeats_that_are_not_side_by_side():
    """An id repeated away from its first entry: ids [3, 1, 3, 0, 1], probs [.1, .2, .3, .15, .25].
        id 3: .1 + .3 = .4 on entry 0;  id 1: .2 + .25 = .45 on entry 1;  id 0: .15 on entry 3;
        the repeats (entries 2 and 4): 0                      -> [.4, .45, 0, .15, 0]
    Catches runs found on the unsorted ids (only side-by-side repeats added: [.1, .2, .3, .15,
    .25] unchanged) and the sums left in sorted order ([.15, .45, 0, .4, 0])."""
    ids, probs = sparse([3, 1, 3, 0, 1], [0.1, 0.2, 0.3, 0.15, 0.25])
    got = su.merged(ids, probs)[0, 0]
    assert torch.allclose(got, torch.tensor([0.4, 0.45, 0.0, 0.15, 0.0]), atol=1e-7), got


def test_prefix_table_by_hand():
    """The projection's table: the target's vocabulary is a, ab, abc, b, (a control token, no
    text), bc. Each token's prefixes that are tokens, itself included, each weighted by its length
    in characters over the row's total:
        a: {a: 1}   ab: {a: 1/3, ab: 2/3}   abc: {a: 1/6, ab: 2/6, abc: 3/6}   b: {b: 1}
        control: {itself: 1}   bc: {b: 1/3, bc: 2/3}
    stored as ids (V, P) int32, -1 padded, and weights (V, P) float32, 0 on the padding. Catches
    the token itself missed, equal weights (ab: 1/2, 1/2), a control token losing its mass, and
    int64 ids (twice the memory at 128k-262k vocabularies)."""
    ids, w = su.prefix_table(["a", "ab", "abc", "b", "", "bc"])
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2], [3, -1, -1], [4, -1, -1],
                            [3, 5, -1]]
    want = torch.tensor([[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 6, 2 / 6, 3 / 6], [1, 0, 0],
                         [1, 0, 0], [1 / 3, 2 / 3, 0]])
    assert torch.allclose(w, want, atol=1e-7)


def test_xtoken_by_hand():
    """X-Token's projection of the teacher, on the table of test_prefix_table_by_hand (ids a, ab,
    abc, b, control, bc). P_t: abc 0.5, bc 0.3, a 0.2, spread over each entry's prefixes:
        P~(a)   = 0.5 x 1/6 + 0.2 x 1 = 17/60      P~(ab) = 0.5 x 2/6 = 10/60
        P~(abc) = 0.5 x 3/6 = 15/60                P~(b)  = 0.3 x 1/3 =  6/60
        P~(bc)  = 0.3 x 2/3 = 12/60                (sum 60/60: a distribution)
    Q_t = [0.1, 0.2, 0.3, 0.1, 0.05, 0.25] over the six ids; L = -sum_u P~(u) ln Q_t(u):
        a and b, both ln 0.1: (17 + 6)/60 x 2.302585 = 0.882658
        ab:  10/60 x ln 5    = 1/6 x 1.609438         = 0.268240
        abc: 15/60 x ln 10/3 = 1/4 x 1.203973         = 0.300993
        bc:  12/60 x ln 4    = 1/5 x 1.386294         = 0.277259
        L                                              = 1.729150
    Catches the projection left out (the plain CE on P_t: 0.5 ln(1/0.3) + 0.3 ln 4 + 0.2 ln 10
    = 1.478) and the student projected instead of the teacher (1.031)."""
    table = su.prefix_table(["a", "ab", "abc", "b", "", "bc"])
    ids, probs = sparse([2, 5, 0], [0.5, 0.3, 0.2])
    got = su.xtoken(logits_of([0.1, 0.2, 0.3, 0.1, 0.05, 0.25]), ids, probs, *table)
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(1.729150, abs=1e-6)


def test_xtoken_is_least_at_the_projection_not_on_a_shared_prefix():
    """The loss a redesign had to fix: projecting the student (-sum_k P(id_k) log sum_{u prefix}
    Q(u)) scored 0 with all of Q_t on a prefix the entries share. Target vocabulary ▁t, ▁the, ▁to
    (▁ is the space mark, one character); P_t = {▁the: 0.5, ▁to: 0.5}.
        W: ▁the -> {▁t: 2/6, ▁the: 4/6},  ▁to -> {▁t: 2/5, ▁to: 3/5}
        P~ = [1/6 + 1/5, 1/3, 3/10] = [11/30, 10/30, 9/30]
    At Q_t = P~ the loss is the entropy of P~,
        11/30 ln 30/11 + 1/3 ln 3 + 3/10 ln 10/3 = 0.367877 + 0.366204 + 0.361192 = 1.095273,
    and its gradient with respect to the logits, Q_t - P~, is 0 there. Moving mass from P~ onto
    the shared prefix ▁t only raises it: half of it there, Q_t = [41/60, 1/6, 3/20]:
        11/30 ln 60/41 + 1/3 ln 6 + 3/10 ln 20/3 = 0.139616 + 0.597253 + 0.569136 = 1.306005.
    Catches the student's projection back (it falls towards 0 as the mass moves onto ▁t) and
    weights that do not sum to 1 (the gradient Q_t sum(P~) - P~ is not 0)."""
    table = su.prefix_table(["\u2581t", "\u2581the", "\u2581to"])
    ids, probs = sparse([1, 2], [0.5, 0.5])
    p_tilde = torch.tensor([11 / 30, 10 / 30, 9 / 30])
    logits = p_tilde.log()[None, None].requires_grad_()                   # (1, 1, 3)
    at_p = su.xtoken(torch.log_softmax(logits, -1), ids, probs, *table)
    assert at_p.item() == pytest.approx(1.095273, abs=1e-6)
    grad, = torch.autograd.grad(at_p.sum(), logits)
    assert grad.abs().max() < 1e-6, grad
    half = su.xtoken(logits_of([41 / 60, 1 / 6, 3 / 20]), ids, probs, *table)
    assert float(half) == pytest.approx(1.306005, abs=1e-6)
    on_prefix = torch.tensor([1.0, 0.0, 0.0])
    for a in (0.01, 0.1, 0.5, 0.9, 0.999):                                # ever more on ▁t
        q = (1 - a) * p_tilde + a * on_prefix
        assert float(su.xtoken(q.log()[None, None], ids, probs, *table)) > at_p.item(), a


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
    """W (V, V) in full: W[t, u] = len(u) when u's text is a prefix of t's (a control token: 1 on
    itself), rows normalised; P~ = P_t W; the soft CE of Q_t against P~."""
    V = len(vocab)
    W = torch.tensor([[float(len(vocab[u])) if vocab[u] != "" and vocab[t].startswith(vocab[u])
                       else float(u == t and vocab[t] == "") for u in range(V)]
                      for t in range(V)])                               # (V, V)
    p_tilde = dense @ (W / W.sum(-1, keepdim=True))                     # (B, T, V)
    return -(p_tilde * torch.log_softmax(logits, -1)).sum(-1)


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
        q, logq = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
        if loss == "uld":
            got, want = su.uld(logq, ids, probs), dense_sorted_l1(dense, q)
        elif loss == "gold":
            got = su.gold(logq, ids, probs, exact)
            want = (-(dense * exact * logq).sum(-1)
                    + dense_sorted_l1(dense * ~exact, q * ~exact))
        else:
            got = su.xtoken(logq, ids, probs, *su.prefix_table(VOCAB))
            want = dense_xtoken(logits, dense, VOCAB)
        assert got.shape == (2, 3)
        assert torch.allclose(got, want, atol=1e-5), (got, want)
        g_got, = torch.autograd.grad(got.sum(), logits, retain_graph=True)   # logq: shared
        g_want, = torch.autograd.grad(want.sum(), logits)
        assert g_got.abs().sum() > 0 and torch.isfinite(g_got).all()
        assert torch.allclose(g_got, g_want, atol=1e-5)


def test_a_bad_fusion_loss_is_refused_before_anything_loads(tmp_path, capsys):
    """A typo in --fusion-loss ends with one line naming the value and the choices (the command
    line's, read from successors.LOSSES, the one list), before the data or the target are read
    (neither exists here, so reaching them would give another error); a config built in code is
    refused by distance_for with the same choices. Catches the command line's list drifting from
    LOSSES and distance_for accepting an unknown name (it would fall through to GOLD)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "none"), "--target", str(tmp_path / "none"),
                    "--fusion-loss", "kl"])
    from extras import cli
    assert cli.TRAIN_CHOICES["fusion_loss"] is su.LOSSES               # one list, not a copy
    assert e.value.code == 2
    assert ("argument --fusion-loss: invalid choice: 'kl' (choose from 'ce', 'uld', 'gold', "
            "'xtoken')") in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--fusion-loss 'kl': choose one of ce, uld, gold, "
                                         r"xtoken \(docs/training.md\)"):
        su.distance_for(train.TrainConfig(fusion_loss="kl"))
