"""pgest.linear_policy_loss against the materialised formula (an independent
plain-PyTorch policy-gradient loss in float64), cross entropy and
linear_cross_entropy, pgest.linear_log_prob (the same per-token numbers), its
gradients for every upstream scalar, the once-only backward, bad input, the
registered op under opcheck and torch.compile, and its workspace."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import devices
from test_linear_head import make, memory_case  # (N, H, V) hidden, weight, bias; the memory tests' inputs

import pgest


def reference(hidden, weight, actions, adv, bias=None, temperature=1.0, beta=0.0, ignore_index=-100,
              reduction="mean", softcap=None):
    """-sum_s A_s log p(a_s) - beta H per token, written from the definition."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    ls = logits.log_softmax(-1)
    a = actions if actions.dim() == hidden.dim() else actions.unsqueeze(-1)
    A = adv if adv.dim() == a.dim() else adv.unsqueeze(-1)
    keep = a != ignore_index
    lp = torch.where(keep, ls.gather(-1, torch.where(keep, a, torch.zeros_like(a))), torch.zeros((), dtype=ls.dtype))
    ent = -(ls.exp() * ls).sum(-1)
    ent = torch.where(keep.any(-1), ent, torch.zeros_like(ent))
    per_token = -(A * lp).sum(-1) - beta * ent
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / keep.sum()


def grads_of(fn, tensors):
    ins = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*ins)
    loss.sum().backward()
    return loss.detach(), [t.grad for t in ins]


@pytest.mark.parametrize("V", [1, 7, 1000, 5001])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("S", [1, 3])
@devices()
def test_matches_the_formula_in_float64(V, with_bias, reduction, S, device):
    N, H = 37, 16
    hidden, weight, bias = make(N, H, V, scale=3.0)
    g = torch.Generator().manual_seed(1)
    shape = (N, S) if S > 1 else (N,)
    actions = torch.randint(0, V, shape, generator=g)
    actions[5] = -100  # a padding token: no loss, no entropy term, no gradient
    if S > 1:
        actions[6, 1] = -100
    adv = torch.randn(shape, dtype=torch.float64, generator=g)
    tensors = (hidden, weight) + ((bias,) if with_bias else ())
    kw = dict(temperature=0.7, beta=0.03, reduction=reduction)
    got, ggot = grads_of(lambda h, w, *b: pgest.linear_policy_loss(
        h, w, actions.to(device), adv.to(device), bias=b[0] if b else None, temperature=0.7, entropy_weight=0.03,
        reduction=reduction, token_tile=16, vocab_tile=300), [t.to(device) for t in tensors])
    got, ggot = got.cpu(), [t.cpu() for t in ggot]
    ref, gref = grads_of(lambda h, w, *b: reference(h, w, actions, adv, b[0] if b else None, **kw), tensors)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (ggot[0][5] == 0).all()


def test_gradcheck_small():
    hidden, weight, bias = make(5, 4, 11, seed=3)
    actions = torch.tensor([[0, 3], [10, 10], [2, -100], [7, 1], [5, 5]])
    adv = torch.randn(5, 2, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        f = lambda h, w, b: pgest.linear_policy_loss(h, w, actions, adv, bias=b, temperature=1.3, entropy_weight=0.2,
                                                     reduction=reduction, token_tile=2, vocab_tile=4)
        torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (hidden, weight, bias)))


def test_same_numbers_as_linear_log_prob():
    # With one vocabulary tile the products are the same calls, so the
    # per-token log-probabilities are linear_log_prob's to the bit: a one-hot
    # advantage picks one token's -log p exactly.
    N, H, V = 40, 16, 300
    hidden, weight, bias = make(N, H, V, dtype=torch.float32, seed=2, scale=2.0)
    actions = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    lp, ent = pgest.linear_log_prob(hidden, weight, actions, bias=bias, token_tile=16, vocab_tile=V)
    for t in (0, 17, 39):
        adv = torch.zeros(N)
        adv[t] = 1.0
        loss = pgest.linear_policy_loss(hidden, weight, actions, adv, bias=bias, reduction="sum", token_tile=16,
                                        vocab_tile=V)
        assert loss.item() == -lp[t].item()
    # and with tiles of the vocabulary, to rounding, entropy term included
    adv = torch.randn(N)
    loss = pgest.linear_policy_loss(hidden, weight, actions, adv, bias=bias, entropy_weight=0.1, vocab_tile=64)
    lp, ent = pgest.linear_log_prob(hidden, weight, actions, bias=bias, vocab_tile=64)
    torch.testing.assert_close(loss, -(adv * lp).mean() - 0.1 * ent.mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_against_float64(dtype, tol):
    N, H, V = 64, 32, 3001
    hidden, weight, bias = make(N, H, V, seed=4, scale=2.0)
    actions = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    adv = torch.randn(N, generator=torch.Generator().manual_seed(6))
    rounded = [t.to(dtype) for t in (hidden, weight, bias)]
    got, ggot = grads_of(lambda h, w, b: pgest.linear_policy_loss(h, w, actions, adv, bias=b, entropy_weight=0.01),
                         rounded)
    ref, gref = grads_of(lambda h, w, b: reference(h, w, actions, adv.double(), b, beta=0.01),
                         [t.double() for t in rounded])
    assert got.dtype == torch.float32 and ggot[1].dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    for a, b in zip(ggot, gref):
        # gradients are rounded to the input dtype: compare against their scale
        assert (a.double() - b).abs().max() <= tol * b.abs().max() + tol * 1e-3, (dtype, a.dtype)


def test_unit_advantages_are_cross_entropy():
    N, H, V = 50, 24, 777
    hidden, weight, _ = make(N, H, V, dtype=torch.float32, seed=6)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7))
    targets[3] = -100
    got, ggot = grads_of(lambda h, w: pgest.linear_policy_loss(h, w, targets, torch.ones(N)), (hidden, weight))
    ref, gref = grads_of(lambda h, w: F.cross_entropy(h @ w.T, targets), (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if hasattr(F, "linear_cross_entropy"):
        lce, glce = grads_of(lambda h, w: F.linear_cross_entropy(h, w, targets), (hidden, weight))
        torch.testing.assert_close(got, lce, rtol=1e-5, atol=1e-6)
        for a, b in zip(ggot, glce):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_upstream_scalar_and_partial_grads():
    N, H, V = 20, 8, 50
    hidden, weight, bias = make(N, H, V, seed=8)
    actions = torch.randint(0, V, (N,))
    adv = torch.randn(N, dtype=torch.float64)
    for k in (1.0, -2.5, 0.0):
        got, ggot = grads_of(lambda h, w, b: k * pgest.linear_policy_loss(h, w, actions, adv, bias=b),
                             (hidden, weight, bias))
        ref, gref = grads_of(lambda h, w, b: k * reference(h, w, actions, adv, b), (hidden, weight, bias))
        for a, b in zip(ggot, gref):
            torch.testing.assert_close(a, b)
    # a frozen head (weight without grad): hidden's gradient alone
    h = hidden.clone().requires_grad_()
    pgest.linear_policy_loss(h, weight, actions, adv).backward()
    h2 = hidden.clone().requires_grad_()
    reference(h2, weight, actions, adv).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    # no gradient wanted: the loss alone
    with torch.no_grad():
        loss = pgest.linear_policy_loss(hidden.requires_grad_(), weight, actions, adv)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden.detach(), weight, actions, adv))


def test_backward_twice_and_graph_accumulation():
    N, H, V = 10, 4, 30
    hidden, weight, _ = make(N, H, V, seed=9)
    actions = torch.randint(0, V, (N,))
    adv = torch.randn(N, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    loss = pgest.linear_policy_loss(h, weight, actions, adv)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    (2 * loss).backward()  # the gradients computed again: the first backward took them
    torch.testing.assert_close(h.grad, 3 * first)
    # the loss used twice in one graph: the two upstream gradients add up
    h3 = hidden.clone().requires_grad_()
    out = pgest.linear_policy_loss(h3, weight, actions, adv)
    (out + 2 * out).backward()
    h4 = hidden.clone().requires_grad_()
    (3 * reference(h4, weight, actions, adv)).backward()
    torch.testing.assert_close(h3.grad, h4.grad)


def test_tied_weights_and_shapes():
    V, H = 40, 8
    emb = torch.nn.Embedding(V, H).double()
    tokens = torch.randint(0, V, (6, 4))
    targets = torch.randint(0, V, (6, 4, 2))
    adv = torch.randn(6, 4, 2, dtype=torch.float64)
    h = torch.tanh(emb(tokens))[:, ::2]  # non-contiguous (B, T, H)
    pgest.linear_policy_loss(h, emb.weight, targets[:, ::2], adv[:, ::2], entropy_weight=0.1).backward()
    g = emb.weight.grad.clone()
    emb.weight.grad = None
    h = torch.tanh(emb(tokens))[:, ::2]
    reference(h, emb.weight, targets[:, ::2], adv[:, ::2], beta=0.1).backward()
    torch.testing.assert_close(g, emb.weight.grad)
    # no tokens; every token ignored (a mean over nothing is nan, as cross_entropy's)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    empty = pgest.linear_policy_loss(torch.zeros(0, H, dtype=torch.float64), w, torch.zeros(0, dtype=torch.long),
                                     torch.zeros(0), reduction="sum")
    assert empty.item() == 0.0
    hh = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
    ignored = pgest.linear_policy_loss(hh, w, torch.full((3,), -100), torch.ones(3))
    assert math.isnan(ignored.item()) and math.isnan(F.cross_entropy(hh @ w.T, torch.full((3,), -100)).item())
    ignored.backward()
    assert (hh.grad == 0).all()


def test_bad_input_messages():
    hidden, weight, bias = make(4, 6, 9, dtype=torch.float32)
    a = torch.tensor([0, 3, 8, 1])
    adv = torch.ones(4)
    cases = [
        (lambda: pgest.linear_policy_loss(hidden, weight, a, adv[:3]), ValueError, "advantages must have shape"),
        (lambda: pgest.linear_policy_loss(hidden, weight, a, adv.long()), TypeError, "advantages"),
        (lambda: pgest.linear_policy_loss(hidden, weight, a, adv, reduction="max"), ValueError, "reduction"),
        (lambda: pgest.linear_policy_loss(hidden, weight, torch.tensor([0, 9, 0, 0]), adv), IndexError,
         r"actions\[1\] = 9 is out of range for 9 actions"),
        (lambda: pgest.linear_policy_loss(hidden, weight[:, :5], a, adv), ValueError, r"weight must be \(V, H\)"),
        (lambda: pgest.linear_policy_loss(hidden, weight, a, adv, entropy_weight=float("nan")), ValueError,
         "entropy_weight"),
        (lambda: pgest.linear_policy_loss(hidden, weight, a, adv, token_tile=0), ValueError, "token_tile"),
        (lambda: pgest.linear_policy_loss(hidden, weight, a.float(), adv), TypeError, "actions"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    bad = hidden.clone().requires_grad_()
    with torch.no_grad():
        bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[2, \d+\].*NaN"):
        pgest.linear_policy_loss(bad, weight, a, adv)


def test_registered_op_opcheck_and_compile():
    from pgest.linear.policy_loss import linear_policy_loss_op

    hidden, weight, bias = make(6, 4, 10, dtype=torch.float32)
    a = torch.randint(0, 10, (6, 2))
    adv = torch.randn(6, 2)
    torch.library.opcheck(linear_policy_loss_op, (hidden, weight, bias, a, adv, 0.1, -100, 1.0, "mean", 4, 3,
                                                    [True, True, True]))
    with pytest.raises(ValueError, match="advantages must be"):
        linear_policy_loss_op(hidden, weight, bias, a, adv.double(), 0.1, -100, 1.0, "mean", 4, 3, [True] * 3)
    with pytest.raises(ValueError, match="reduction"):
        linear_policy_loss_op(hidden, weight, bias, a, adv, 0.1, -100, 1.0, "none", 4, 3, [True] * 3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, w, b):
        return 2.0 * pgest.linear_policy_loss(h, w, a, adv, bias=b, entropy_weight=0.1)

    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    f(*ins).backward()
    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    (2.0 * pgest.linear_policy_loss(*ref[:2], a, adv, bias=ref[2], entropy_weight=0.1)).backward()
    for x, y in zip(ins, ref):
        torch.testing.assert_close(x.grad, y.grad)


def test_workspace_is_a_small_part_of_the_logits():
    N = 4096
    hidden, weight, actions, logits_bytes = memory_case(N, 64, 32000)
    adv = torch.randn(N)

    def step():
        # default token tile (its buffers within 1/22 of the logits)
        pgest.linear_policy_loss(hidden, weight, actions, adv, entropy_weight=0.01, vocab_tile=8192).backward()

    from pgest.examples.memory import largest_allocation_bytes, peak_allocated_bytes

    step()
    hidden.grad = weight.grad = None
    peak, largest = peak_allocated_bytes(step), largest_allocation_bytes(step)
    grads = hidden.numel() * 4 + weight.numel() * 4
    assert largest <= max(logits_bytes / 20, grads), largest
    assert peak - grads < logits_bytes / 20, (peak, grads)
    # the check can fail: a token tile of a quarter of the tokens trips it
    big = lambda: pgest.linear_policy_loss(hidden, weight, actions, adv, token_tile=N // 4, vocab_tile=8192).backward()
    assert peak_allocated_bytes(big) - grads > logits_bytes / 20


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softcap_matches_the_formula_in_float64(reduction):
    # Gemma 2's final soft-capping in the fused loss: values and gradients, the
    # second-derivative route, and the registered op under torch.compile
    hidden, weight, bias = make(11, 6, 2500, scale=4.0)
    g = torch.Generator().manual_seed(3)
    actions = torch.randint(0, 2500, (11, 2), generator=g)
    actions[4, 1] = -100
    adv = torch.randn(11, 2, generator=g, dtype=torch.float64)
    kw = dict(temperature=0.8, entropy_weight=0.05, reduction=reduction)
    got, got_g = grads_of(lambda h, w, b: pgest.linear_policy_loss(h, w, actions, adv, bias=b, softcap=2.0, **kw),
                          (hidden, weight, bias))
    want, want_g = grads_of(lambda h, w, b: reference(h, w, actions, adv, b, 0.8, 0.05, reduction=reduction,
                                                      softcap=2.0), (hidden, weight, bias))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    uncapped = pgest.linear_policy_loss(hidden, weight, actions, adv, bias=bias, **kw)
    assert (uncapped - got).abs().max() > 1e-3  # the cap bites at these logits
    if reduction == "mean":
        h = hidden[:3, :4].clone().requires_grad_()
        w = weight[:30, :4].clone().requires_grad_()
        a3, adv3 = actions[:3] % 30, adv[:3]
        fn = lambda x, y: pgest.linear_policy_loss(x, y, a3, adv3, softcap=1.5)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (h, w))
        compiled = torch.compile(lambda x, y: pgest.linear_policy_loss(x, y, actions, adv, bias=bias, softcap=2.0,
                                                                       **kw), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(hidden, weight), got, rtol=1e-12, atol=1e-12)
