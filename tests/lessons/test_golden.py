"""Fixed weights give known logits: one model worked by hand, two pinned to values transformers
computed once."""
import math

import pytest
import torch

import fusellm


def test_identity_blocks_leave_embedding_norm_and_head():
    """With attention and MLP outputs zeroed, each block is the identity and the logits are W_out @
    (g * e / rms(e)). For e = (3, 4): rms = sqrt((9 + 16) / 2) = 3.5355, e / rms = (0.84853,
    1.13137); with g = (1, 2): h = (0.84853, 2.26274); W_out rows (1, 0), (0, 1), (1, 1) give
    (0.84853, 2.26274, 3.11127)."""
    args = fusellm.ModelArgs(vocab_size=3, dim=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                             hidden_dim=2, sliding_layers=(False,), norm_eps=0.0)
    m = fusellm.Transformer(args)
    with torch.no_grad():
        m.tok_embeddings.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]]))
        m.layers[0].attention.wo.weight.zero_()
        m.layers[0].feed_forward.w2.weight.zero_()
        m.norm.weight.copy_(torch.tensor([1.0, 2.0]))
        m.output.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        logits = m(torch.tensor([[0]]))[0, 0]
    expected = torch.tensor([3 / math.sqrt(12.5), 8 / math.sqrt(12.5), 11 / math.sqrt(12.5)])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits, torch.tensor([0.84853, 2.26274, 3.11127]), atol=1e-5)


def test_alibi_slopes_for_power_of_two_and_other_head_counts():
    """8 heads: 2^-1 .. 2^-8. 6 heads: the 8-head series, odd positions (2^-2, 2^-4, 2^-6, 2^-8)
    then even ones (2^-1, 2^-3, ...), cut to 6."""
    assert fusellm.alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    assert fusellm.alibi_slopes(6).tolist() == [2.0 ** -k for k in (2, 4, 6, 8, 1, 3)]


def sine_weights_(model):
    """Every parameter (in name order) filled with 0.5 sin(0.37 n + i): fixed, formula-defined
    weights."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            n = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.5 * torch.sin(n * 0.37 + i)).view(p.shape))
    return model


IDS = torch.tensor([[1, 5, 9, 2, 7]])
# Logits computed once with transformers 5.24 (LlamaForCausalLM / MptForCausalLM) on the saved
# models.
GOLDEN = {
    "llama": (dict(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                   hidden_dim=12, sliding_layers=(False,)),
              [0.62047, -0.71974, 0.79534, -0.84479, 0.86646, -0.85963, 0.82454, -0.76233,
               0.67505, -0.56557, 0.43749],
              [0.05299, -0.53335, -0.96804, 0.21159, -0.84479]),
    "mpt": (dict(model_type="mpt", vocab_size=11, dim=12, n_layers=1, n_heads=6, n_kv_heads=6,
                 head_dim=2, hidden_dim=48, norm="layer", mlp="gelu", tie_embeddings=True,
                 pos="alibi", norm_eps=1e-5, sliding_layers=(False,)),
            [-0.2121, 0.60979, -0.11601, -0.54737, 0.41053, 0.32648, -0.5862, -0.01107, 0.59215,
             -0.30755, -0.42667],
            [0.07772, 0.81922, 0.53273, 0.78028, -0.54737]),
}


@pytest.mark.parametrize("family", list(GOLDEN))
def test_formula_weights_give_the_pinned_logits(family):
    kwargs, last_position, token_3_over_time = GOLDEN[family]
    m = sine_weights_(fusellm.Transformer(fusellm.ModelArgs(**kwargs))).eval()
    with torch.no_grad():
        logits = m(IDS)[0]
    assert torch.allclose(logits[4], torch.tensor(last_position), atol=2e-5)
    assert torch.allclose(logits[:, 3], torch.tensor(token_3_over_time), atol=2e-5)
