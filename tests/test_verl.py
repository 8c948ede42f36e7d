"""pgest.integrations.verl.linear_cross_entropy against the formula verl's
own tests hold its fused kernel to (logits = hidden @ weight.T / temperature
in float32 there, float64 here; log-probs = -cross_entropy; entropy =
logsumexp - sum p x), values and gradients, for verl's (batch, tokens, H)
inputs and the three reductions."""
import pytest
import torch

from pgest.integrations.verl import linear_cross_entropy


def formula(hidden, weight, labels, temperature, reduction):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T / temperature
    lp = -torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction=reduction)
    p = logits.softmax(-1)
    return lp, torch.logsumexp(logits, -1) - (p * logits).sum(-1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "MEAN"])
@pytest.mark.parametrize("shape", [(2, 7), (9,)])
def test_values_and_gradients_match_the_formula(reduction, shape):
    g = torch.Generator().manual_seed(3)
    H, V = 16, 4500  # more than one vocabulary piece
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, shape, generator=g)
    g_lp = torch.randn(() if reduction != "none" else (labels.numel(),), generator=g, dtype=torch.float64)
    g_ent = torch.randn(labels.numel(), generator=g, dtype=torch.float64)
    grads = []
    outs = []
    for fn in (linear_cross_entropy, formula):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = fn(h, w, labels, 1.5, reduction.lower() if fn is formula else reduction)
        torch.autograd.backward((lp, ent), (g_lp, g_ent))
        outs.append((lp.detach(), ent.detach()))
        grads.append((h.grad, w.grad))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert outs[0][1].shape == (labels.numel(),)  # the entropy stays per token, as verl's kernel returns it


def test_bf16_inputs_give_float32_outputs_close_to_the_formula():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 33, 64, generator=g).bfloat16()
    weight = (torch.randn(3000, 64, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, 3000, (1, 33), generator=g)
    lp, ent = linear_cross_entropy(hidden, weight, labels, 0.9, "none")
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_lp, ref_ent = formula(hidden.double(), weight.double(), labels, 0.9, "none")
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-4)


def test_bad_arguments_name_themselves():
    h, w, lab = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, lab, 1.0, "avg")
    with pytest.raises(TypeError, match="temperature"):
        linear_cross_entropy(h, w, lab, "1.0")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError, match=r"labels\[0\] = 7"):
        linear_cross_entropy(h, w, torch.full((3,), 7))  # a label outside the vocabulary
