"""Fusion turns the candidates' distributions into one target P_t, and the sparse loss trains on it
exactly as the dense soft-label cross-entropy would."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusellm import Batch, avgce_weights, collate, fuse, token_losses

V = 6


def dense(ids, probs, V=V):
    """The sparse distribution written out over the whole vocabulary (duplicates add up)."""
    return torch.zeros(*ids.shape[:-1], V, dtype=probs.dtype).scatter_add_(-1, ids, probs)


def test_sparse_losses_and_gradients_equal_dense_cross_entropies():
    """The training losses (token_losses, what fusellm.fusion_loss calls) equal torch's dense
    cross-entropy with probability targets and with class labels, values and gradients. Catches a
    gather on the wrong ids, a missing log-softmax, or duplicates in the sparse P_t counted once."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (2, 5, 7), generator=g)                 # duplicates included
    probs = torch.rand(2, 5, 7, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    labels[1, 3] = -100
    clm, fusion = token_losses(logits, labels, ids, probs)
    (g_sparse,) = torch.autograd.grad(fusion.sum(), logits)
    P = dense(ids, probs, 50)
    dense_loss = F.cross_entropy(logits.transpose(1, 2), P.transpose(1, 2),
                                 reduction="none")                                   # (2, 5)
    (g_dense,) = torch.autograd.grad(dense_loss.sum(), logits)
    assert torch.allclose(fusion, dense_loss, atol=1e-5)
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)
    expected_clm = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                                   ignore_index=-100)
    assert torch.allclose(clm, expected_clm, atol=1e-5) and clm[1, 3] == 0


def candidates(labels=(3, 4), ce=(2.0, 0.5, 1.0), p=None):
    """Three candidates, one window (B=1), two positions, K=2, labels (3, 4).
    candidate 0 (the target):  pos 0 {1: .5, 3: .5}   pos 1 {4: .5, 2: .5}   CE 2.0
    candidate 1:               pos 0 {3: .8, 2: .2}   pos 1 falls back       CE 0.5
    candidate 2:               pos 0 {5: 1.0}         pos 1 {4: .9, 0: .1}   CE 1.0"""
    ids = torch.tensor([[[[1, 3], [4, 2]]], [[[3, 2], [0, 0]]], [[[5, 0], [4, 0]]]])  # (C, B, T, K)
    if p is None:
        p = [[[[.5, .5], [.5, .5]]], [[[.8, .2], [0., 0.]]], [[[1., 0.], [.9, .1]]]]
    fallback = torch.tensor([[[False, False]], [[False, True]], [[False, False]]])       # (C, B, T)
    return Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), labels=torch.tensor([labels]),
                 fusion_mask=torch.ones(1, 2, dtype=torch.bool), cand_ids=ids,
                 cand_logprobs=torch.log(torch.tensor(p)), cand_fallback=fallback,
                 window_ce=torch.tensor([[c] for c in ce]))


def test_mince_picks_lowest_ce_candidate_and_its_fallback_one_hot():
    ids, probs = fuse(candidates(), method="mince")
    P = dense(ids, probs)[0]
    assert torch.allclose(P[0], torch.tensor([0, 0, .2, .8, 0, 0]))     # candidate 1 (CE 0.5)
    assert torch.allclose(P[1], torch.tensor([0, 0, 0, 0, 1., 0]))  # falls back: one-hot on label 4


def test_avgce_official_weights_are_softmax_of_exp_minus_ce():
    """CE 0 and ln 2: exp(-CE) = 1 and 0.5, so the weights are e^1 / (e^1 + e^0.5) = 0.6225 and
    0.3775."""
    w = avgce_weights(torch.tensor([0.0, math.log(2)]), "official")
    assert torch.allclose(w, torch.tensor([0.6225, 0.3775]), atol=1e-4)
    w = avgce_weights(torch.tensor([1.0, 2.0]), "softmax", tau=1.0)  # e^-1 / (e^-1 + e^-2) = .7311
    assert torch.allclose(w, torch.tensor([0.7311, 0.2689]), atol=1e-4)


def test_avgce_mixes_every_candidate_with_its_weight():
    c = candidates()
    ids, probs = fuse(c, method="avgce")
    w = avgce_weights(c.window_ce, "official")[:, 0]
    P = dense(ids, probs)[0]
    expected0 = (w[0] * torch.tensor([0, .5, 0, .5, 0, 0])
                 + w[1] * torch.tensor([0, 0, .2, .8, 0, 0])
                 + w[2] * torch.tensor([0, 0, 0, 0, 0, 1.]))
    expected1 = (w[0] * torch.tensor([0, 0, .5, 0, .5, 0])
                 + w[1] * torch.tensor([0, 0, 0, 0, 1., 0])
                 + w[2] * torch.tensor([.1, 0, 0, 0, .9, 0]))
    assert torch.allclose(P[0], expected0, atol=1e-6) and torch.allclose(P[1], expected1, atol=1e-6)


def test_token_mince_picks_the_candidate_most_sure_of_the_label():
    """Position 0 (label 3): candidate 1 gives it 0.8, the target 0.5, candidate 2 nothing ->
    candidate 1. Position 1 (label 4): candidate 1 falls back and does not compete; candidate 2
    gives 0.9 -> candidate 2."""
    ids, probs = fuse(candidates(), method="mince_token")
    P = dense(ids, probs)[0]
    assert torch.allclose(P[0], torch.tensor([0, 0, .2, .8, 0, 0]))
    assert torch.allclose(P[1], torch.tensor([.1, 0, 0, 0, .9, 0]))


def test_token_fusion_with_no_candidate_knowing_the_label_is_a_one_hot():
    c = candidates(labels=(0, 1))         # no candidate has 0 at position 0 nor 1 at position 1
    for method in ("mince_token", "avgce_token"):
        i, p = fuse(c, method=method)
        P = dense(i, p)[0]
        assert torch.allclose(P[0], torch.eye(V)[0]) and torch.allclose(P[1], torch.eye(V)[1])


def test_token_avgce_weights_by_token_ce():
    """Position 0, label 3: competing candidates 0 (p=.5) and 1 (p=.8); weights softmax(log p) = p /
    sum p."""
    ids, probs = fuse(candidates(), method="avgce_token", tau=1.0)
    P = dense(ids, probs)[0]
    w0, w1 = .5 / 1.3, .8 / 1.3
    expected = w0 * torch.tensor([0, .5, 0, .5, 0, 0]) + w1 * torch.tensor([0, 0, .2, .8, 0, 0])
    assert torch.allclose(P[0], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["mince", "avgce", "mince_token", "avgce_token"])
def test_every_fusion_is_a_distribution(method):
    ids, probs = fuse(candidates(), method=method)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2)) and (probs >= 0).all()


def test_temperature_flattens_each_candidate():
    """Temperature T divides each candidate's log-probs: p^(1/T), renormalised."""
    c = candidates(ce=(0.0, 1.0, 2.0),
                   p=[[[[.9, .1], [.5, .5]]], [[[.8, .2], [1., 0.]]], [[[1., 0.], [.9, .1]]]])
    i, p = fuse(c, method="mince", temperature=2.0)
    P = dense(i, p)[0, 0]
    expected = torch.tensor([.9, .1]).sqrt() / torch.tensor([.9, .1]).sqrt().sum()   # p^(1/T)
    assert torch.allclose(P[[1, 3]], expected, atol=1e-6)


def test_mince_takes_the_lowest_ce_window_and_ties_go_to_the_target():
    """CEs (2.0, 0.5, 1.0) pick candidate 1 (its position-0 top-K {3: .8, 2: .2}); CEs (1.0, 1.0,
    2.0) tie, and the earlier candidate, the target itself, wins ({1: .5, 3: .5}). Catches argmax
    for argmin, or the last of tied candidates."""
    P = dense(*fuse(candidates(ce=(2.0, 0.5, 1.0)), method="mince"))[0, 0]
    assert torch.allclose(P, torch.tensor([0, 0, .2, .8, 0, 0]))
    P = dense(*fuse(candidates(ce=(1.0, 1.0, 2.0)), method="mince"))[0, 0]
    assert torch.allclose(P, torch.tensor([0, .5, 0, .5, 0, 0]))


def test_avgce_softmax_weights_divide_the_ce_by_tau():
    """softmax(-CE / tau) with CE (1, 2) and tau 2: e^-0.5 / (e^-0.5 + e^-1) = 0.6225. Multiplying
    by tau instead would give e^-2 / (e^-2 + e^-4) = 0.8808; tau 1 cannot tell the two apart."""
    w = avgce_weights(torch.tensor([1.0, 2.0]), "softmax", tau=2.0)
    assert torch.allclose(w, torch.tensor([0.6225, 0.3775]), atol=1e-4)
    c = candidates(ce=(1.0, 2.0, 1.0))
    P = dense(*fuse(c, method="avgce", avg_weights="softmax", tau=2.0))[0, 0]
    w = torch.softmax(-torch.tensor([1.0, 2.0, 1.0]) / 2, dim=0)       # 0.3837, 0.2327, 0.3837
    expected = (w[0] * torch.tensor([0, .5, 0, .5, 0, 0])
                + w[1] * torch.tensor([0, 0, .2, .8, 0, 0])
                + w[2] * torch.tensor([0, 0, 0, 0, 0, 1.]))
    assert torch.allclose(P, expected, atol=1e-6)


def test_token_avgce_weights_divide_the_token_ce_by_tau():
    """Position 0, label 3: candidates 0 and 1 compete with p = .5 and .8; weights softmax(log p /
    tau) are p^(1/tau), renormalised: with tau 2, sqrt(.5) / (sqrt(.5) + sqrt(.8)) = 0.4416.
    Multiplying by tau would give .25 / (.25 + .64) = 0.2809."""
    P = dense(*fuse(candidates(), method="avgce_token", tau=2.0))[0, 0]
    w0 = .5 ** .5 / (.5 ** .5 + .8 ** .5)
    assert abs(w0 - 0.4416) < 1e-4
    expected = (w0 * torch.tensor([0, .5, 0, .5, 0, 0])
                + (1 - w0) * torch.tensor([0, 0, .2, .8, 0, 0]))
    assert torch.allclose(P, expected, atol=1e-6)


def padded_window_with_bos():
    """Two windows (B=2) of two candidates (C=2), T=3, K=2, BOS id 1; window 1 is one token short.
    position:        0 (BOS -> first)   1                  2
    window 0 labels  3                  4                  5
             mask    off                on                 on
    window 1 labels  2                  5                  -100 (pad)
             mask    off                on                 off
    On the mask, candidate 0 gives {label: .6, other: .4}, candidate 1 falls back; off it, no
    entries at all (as collate stores them)."""
    labels = torch.tensor([[3, 4, 5], [2, 5, -100]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    ids = torch.stack([torch.stack([labels.clamp(min=0), (labels.clamp(min=0) + 1) % V], -1)] * 2)
    lp = torch.log(torch.tensor([.6, .4])).expand(2, 2, 3, 2).clone()    # (C, B, T, K)
    lp[:, ~mask] = -torch.inf
    fallback = torch.stack([torch.zeros(2, 3, dtype=torch.bool), mask])   # (C, B, T)
    lp[1][mask] = -torch.inf
    return Batch(input_ids=torch.tensor([[1, 3, 4], [1, 2, 0]]), labels=labels, fusion_mask=mask,
                 cand_ids=ids, cand_logprobs=lp, cand_fallback=fallback,
                 window_ce=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


@pytest.mark.parametrize("method", ["mince", "avgce", "mince_token", "avgce_token"])
def test_fusion_loss_sums_only_the_positions_in_the_fusion_mask(method):
    """The fusion term sums the soft-label CE over fusion_mask only: not the BOS -> first position,
    not padding. With uniform logits over V=6 every fused position costs ln 6 (P_t sums to one), so
    the window pair's 3 masked positions give 3 ln 6 and, at lambda 0 over n_fus = 3, a loss of
    ln 6; with random logits the sum is token_losses' fusion term over the mask, added up here.
    Catches the mask ignored (fus.sum()): the per-token fusions put a one-hot on the label at the
    BOS position and on padding, 6 ln 6 instead of 3 ln 6."""
    from fusellm import fusion_loss
    b = padded_window_with_bos()
    loss, clm, fus = fusion_loss(torch.zeros(2, 3, V), b, 0.0, 5, 3, method)
    assert fus.item() == pytest.approx(3 * math.log(V), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)
    assert clm.item() == pytest.approx(5 * math.log(V), rel=1e-6)       # 5 labelled positions
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0))
    _, per_position = token_losses(logits, b.labels, *fuse(b, method))
    expected = per_position[0, 1] + per_position[0, 2] + per_position[1, 1]     # the mask, by hand
    _, _, fus = fusion_loss(logits, b, 0.5, 5, 3, method)
    assert fus.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_successor_distance_takes_the_fusion_terms_place_on_the_same_positions():
    """fusion_loss(distance=...) (train.py --fusion-loss, extras/successors.py) scores the same
    sparse P_t with another distance, summed over fusion_mask and divided by n_fus as the CE is.
    ULD on padded_window_with_bos, MinCE, uniform logits over V=6 (Q_t = 1/6 everywhere):
        window 0 takes candidate 0 (CE 1.0 < 2.0): at positions 1 and 2 P_t = {.6, .4}, sorted
            [.6, .4, 0] against Q_t's top 3 [1/6, 1/6, 1/6], plus Q_t's 3/6 past them:
            (.6 - 1/6) + (.4 - 1/6) + 1/6 + 3/6 = 4/3 each
        window 1 takes candidate 1 (CE 1.0 < 2.0), which falls back: at position 1 a one-hot,
            (1 - 1/6) + 1/6 + 1/6 + 3/6 = 5/3
        sum over the mask: 4/3 + 4/3 + 5/3 = 13/3; at lambda 0 over n_fus = 3, the loss 13/9.
    Catches the distance ignored (the CE: 3 ln 6 = 5.375) and the mask ignored (the three positions
    off it have P_t = 0, a distance of 1 each: 22/3)."""
    from extras.successors import uld
    from fusellm import fusion_loss
    loss, _, fus = fusion_loss(torch.zeros(2, 3, V), padded_window_with_bos(), 0.0, 5, 3, "mince",
                               distance=uld)
    assert fus.item() == pytest.approx(13 / 3, rel=1e-6)
    assert loss.item() == pytest.approx(13 / 9, rel=1e-6)


def test_a_successor_distance_reuses_the_one_log_softmax():
    """With a distance (GOLD here: its soft-CE part and its sorted L1 both need Q_t), the (B, T, V)
    logits go through one log-softmax in all, and the distance is handed those log-probabilities
    (each position's exp sums to 1), while the CLM term stays the plain cross-entropy. Catches a
    second (B, T, V) softmax or log-softmax inside the distance (the memory the review found) and
    the raw logits handed to it (their exp sums to 6 with zero logits)."""
    from torch.overrides import TorchFunctionMode

    from extras.successors import Distance, gold
    from fusellm import fusion_loss

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.dense = 0                                   # (log-)softmaxes over (B, T, V)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("softmax", "log_softmax", "_softmax", "_log_softmax") \
                    and tuple(args[0].shape) == (2, 3, V):
                self.dense += 1
            return func(*args, **(kwargs or {}))

    seen = []
    inner = Distance("gold", gold, torch.tensor([True, False, True, False, True, False]))
    distance = lambda logq, ids, probs: seen.append(logq) or inner(logq, ids, probs)  # noqa: E731
    logits = torch.zeros(2, 3, V)
    with Count() as count:
        _, clm, _ = fusion_loss(logits, padded_window_with_bos(), 0.5, 5, 3, "mince",
                                distance=distance)
    assert count.dense == 1
    assert torch.allclose(seen[0].exp().sum(-1), torch.ones(2, 3))
    assert clm.item() == pytest.approx(5 * math.log(V), rel=1e-6)      # 5 labelled positions


def test_collate_without_bos_puts_row_i_at_position_i():
    """A target tokenizer without BOS (GPT-2, Qwen2): the sequence is the window's tokens alone,
    so row i of the stored distributions (predicting x_{i+1}) lands at position i, not i + 1.
    Window 0 is x = [3, 5, 4, 6]: input_ids [3, 5, 4], labels [5, 4, 6], every position fused
    (rows 0, 1, 2; row 3 predicts past the window). Window 1 is [7, 8]: input_ids [7, pad, pad],
    labels [8, -100, -100], only position 0 fused. The target's rows are told apart by their ids
    (row r holds [10 + 2r, 11 + 2r]); the source carries counts [1, 0, 2, .] onto window 0, so
    position 1 falls back and position 2 keeps both entries. Catches BOS prepended whatever the
    tokenizer (a None token, or every row one position late), as collate's `nb` offset guards."""
    def item(tokens, counts):
        n = len(tokens)
        rows = np.arange(2 * n).reshape(n, 2) + 10                      # (n, 2) row r: 10+2r, 11+2r
        src = {"counts": np.array(counts), "ids": rows + 100, "ce": 1.0,
               "logprobs": np.full((n, 2), np.log(0.5), dtype=np.float32)}
        return {"tokens": tokens, "sources": {"s": src},
                "target": {"topk_ids": rows, "topk_logprobs": np.zeros((n, 2)), "ce": 2.0}}

    b = collate([item([3, 5, 4, 6], [1, 0, 2, 0]), item([7, 8], [2, 0])], ["target", "s"], None, 2)
    assert b.input_ids.tolist() == [[3, 5, 4], [7, 0, 0]]
    assert b.labels.tolist() == [[5, 4, 6], [8, -100, -100]]
    assert b.fusion_mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.cand_ids[0, 0].tolist() == [[10, 11], [12, 13], [14, 15]]     # rows 0..2 at 0..2
    assert b.cand_ids[0, 1, 0].tolist() == [10, 11]
    assert b.cand_fallback[1].tolist() == [[False, True, False], [False, False, False]]
    assert torch.isinf(b.cand_logprobs[1, 0, 0, 1]) and b.cand_logprobs[1, 0, 0, 0] == math.log(.5)
    assert torch.isfinite(b.cand_logprobs[1, 0, 2]).all()
    assert torch.isinf(b.cand_logprobs[:, 1, 1:]).all()                    # padding: no entries
