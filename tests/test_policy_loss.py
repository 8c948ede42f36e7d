"""pgest.policy_loss: equal to cross_entropy (loss and gradient) at unit
advantages, gradcheck in float64, the seed's entropy regulariser, reductions,
ignore_index, torch.compile, opcheck, and what autograd saves."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import devices, on_each_device

import pgest
from pgest.ops.policy_loss import policy_loss_backward_op, policy_loss_op

GRAD_TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-7),
            torch.float16: (1e-2, 1e-5), torch.bfloat16: (2e-2, 1e-4)}


def _inputs(shape, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_(requires_grad)
    actions = torch.randint(0, shape[-1], shape[:-1], generator=g)
    adv = torch.randn(shape[:-1], generator=g)
    return logits, actions, adv


@devices()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(64, 10), (4, 6, 1000), (3, 2500)])
def test_equals_cross_entropy_with_unit_advantages(dtype, reduction, shape, device):
    logits, labels, _ = _inputs(shape, dtype)
    logits = logits.detach().to(device).requires_grad_()
    labels = labels.to(device)
    labels.view(-1)[::5] = -100  # ignored rows
    ours = pgest.policy_loss(logits, labels, torch.ones(labels.shape, device=device), reduction=reduction)
    (ours.sum()).backward()
    g_ours, logits.grad = logits.grad.clone(), None
    x = logits.float() if dtype != torch.float64 else logits
    ce = F.cross_entropy(x.reshape(-1, shape[-1]), labels.reshape(-1), reduction=reduction)
    ce = ce.view(labels.shape) if reduction == "none" else ce
    ce.sum().backward()
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(ours.to(ce.dtype), ce, rtol=max(rtol, 1e-6), atol=max(atol, 1e-6))
    torch.testing.assert_close(g_ours, logits.grad, rtol=rtol, atol=atol)


@on_each_device
def test_gradcheck_float64_with_entropy_and_samples():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    logits.data[1, 3] = -math.inf  # an impossible action: zero gradient there
    actions = torch.tensor([[0, 2], [1, 1], [6, 0], [3, 3], [-100, 4]])
    weights = torch.randn(5, 2, dtype=torch.float64)

    def f(x):
        return policy_loss_op(x, actions, weights, 0.3, -100, None, None)[0]

    x = logits.detach().clone()
    x[1, 3] = -5.0  # gradcheck perturbs entries, so keep them finite here
    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), eps=1e-6, atol=1e-8)
    loss = policy_loss_op(logits, actions, weights, 0.3, -100, None, None)[0].sum()
    loss.backward()
    assert logits.grad[1, 3] == 0
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@on_each_device
def test_entropy_term_matches_the_seed(dtype):
    """entropy_weight adds the seed's entropy_weight * sum(log_probs * exp(log_probs)) / batch_size."""
    B, K, beta = 32, 50, 0.01
    logits, actions, adv = _inputs((B, K), dtype)
    ours = pgest.policy_loss(logits, actions, adv, entropy_weight=beta)
    ours.backward()
    g_ours, logits.grad = logits.grad.clone(), None
    log_probs = torch.log_softmax(logits, -1)
    seed = (-adv.to(dtype) * log_probs.gather(1, actions[:, None])[:, 0]).mean()
    seed = seed + beta * torch.sum(log_probs * torch.exp(log_probs)) / B
    seed.backward()
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(ours, seed, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_ours, logits.grad, rtol=rtol, atol=atol)


@on_each_device
def test_advantage_weighted_loss_is_weighted_cross_entropy():
    logits, actions, adv = _inputs((4, 3, 200))
    ours = pgest.policy_loss(logits, actions, adv, reduction="none")
    ce = F.cross_entropy(logits.reshape(-1, 200), actions.reshape(-1), reduction="none").view(4, 3) * adv
    torch.testing.assert_close(ours, ce, rtol=1e-5, atol=1e-6)


@on_each_device
def test_all_rows_ignored_mean_is_nan_like_cross_entropy():
    logits, _, adv = _inputs((4, 5))
    actions = torch.full((4,), -100)
    ours = pgest.policy_loss(logits, actions, adv)
    ce = F.cross_entropy(logits, actions)
    assert math.isnan(ours.item()) and math.isnan(ce.item())
    ours.backward()
    assert (logits.grad == 0).all() or torch.isnan(logits.grad).all()


@on_each_device
def test_non_contiguous_logits():
    base = torch.randn(300, 40, dtype=torch.float64)
    logits = base.t().requires_grad_()  # (40, 300), column stride 40
    _, actions, adv = _inputs((40, 300))
    pgest.policy_loss(logits, actions, adv).backward()
    g, logits.grad = logits.grad.clone(), None
    (F.cross_entropy(logits, actions, reduction="none") * adv.double()).mean().backward()
    torch.testing.assert_close(g, logits.grad)


def test_saves_no_rows_by_k_tensor():
    """Autograd keeps the logits themselves (no copy) and O(rows) statistics."""
    R, K = 64, 4096
    logits, actions, adv = _inputs((R, K))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pgest.policy_loss(logits, actions, adv, entropy_weight=0.1)
    big = [t for t in saved if t.numel() >= R * K]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()  # the input, not a copy
    small = sum(t.numel() * t.element_size() for t in saved if t.numel() < R * K)
    assert small <= 64 * R
    loss.backward()


def test_compile_fullgraph():
    logits, actions, adv = _inputs((16, 100))

    def step(x, a, w):
        return pgest.policy_loss(x, a, w, entropy_weight=0.01)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(logits, actions, adv)
    out.backward()
    g, logits.grad = logits.grad.clone(), None
    step(logits, actions, adv).backward()
    torch.testing.assert_close(g, logits.grad)


def test_opcheck():
    logits, actions, adv = _inputs((8, 300))
    a2, w2 = actions[:, None], adv[:, None]
    torch.library.opcheck(policy_loss_op, (logits, a2, w2, 0.1, -100, None, None))
    m = logits.detach().amax(-1)
    stats = torch.stack([m, torch.logsumexp(logits.detach() - m[:, None], -1)])
    ent = torch.distributions.Categorical(logits=logits.detach()).entropy()
    torch.library.opcheck(policy_loss_backward_op, (torch.ones(8), logits.detach(), a2, w2, stats, ent, 0.1, -100))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, a, w: pgest.policy_loss(x, a.float(), w), TypeError, "actions must be an integer"),
        (lambda x, a, w: pgest.policy_loss(x, a[:3], w), ValueError, r"actions must have shape \(4,\)"),
        (lambda x, a, w: pgest.policy_loss(x, a, w[:3]), ValueError, r"advantages must have shape \(4,\)"),
        (lambda x, a, w: pgest.policy_loss(x, a, w.long()), TypeError, "advantages must be float"),
        (lambda x, a, w: pgest.policy_loss(x, a, w, reduction="avg"), ValueError, "reduction"),
        (lambda x, a, w: pgest.policy_loss(x, torch.tensor([0, 9, 1, 2]), w), IndexError, r"actions\[1\] = 9"),
        (lambda x, a, w: pgest.policy_loss(x, torch.tensor([0, 1, -1, 2]), w), IndexError, r"actions\[2\] = -1"),
        (lambda x, a, w: pgest.policy_loss(x, a, w, entropy_weight="0.1"), TypeError, "entropy_weight"),
        (lambda x, a, w: pgest.policy_loss(x.numpy(), a, w), TypeError, "logits must be a torch.Tensor"),
    ],
)
@on_each_device
def test_bad_arguments(call, exc, match):
    x = torch.randn(4, 5)
    a = torch.tensor([0, 1, 2, 3])
    w = torch.ones(4)
    with pytest.raises(exc, match=match):
        call(x, a, w)


@on_each_device
def test_nan_row_is_reported_with_its_index():
    x = torch.randn(2, 3, 50)
    x[1, 0, 7] = math.nan
    with pytest.raises(ValueError, match=r"logits\[1, 0, 7\] is nan"):
        pgest.policy_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


@pytest.mark.parametrize("dtype,R", [(torch.float32, 37), (torch.float64, 37), (torch.bfloat16, 130)])
def test_large_gradient_written_with_streaming_stores(dtype, R):
    """Past 16 MiB the backward writes around the cache; same numbers."""
    K = 70001  # R x K is past 16 MiB; odd K so rows start misaligned
    logits, actions, adv = _inputs((R, K), dtype)
    pgest.policy_loss(logits, actions, adv, entropy_weight=0.02).backward()
    g, logits.grad = logits.grad.clone(), None
    x = logits.float() if dtype == torch.bfloat16 else logits  # reference in fp32 for bf16
    lp = torch.log_softmax(x, -1)
    ref = -(adv.to(lp.dtype) * lp.gather(1, actions[:, None])[:, 0]).mean() + 0.02 * (lp.exp() * lp).sum() / R
    ref.backward()
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(g, logits.grad, rtol=rtol, atol=atol)


@on_each_device
def test_several_samples_per_row():
    """actions (..., S): the loss sums -w log p over samples; mean divides by
    the number of actions not ignored."""
    B, T, K, S = 3, 5, 40, 4
    logits = torch.randn(B, T, K, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, K, (B, T, S))
    actions[0, 0, 1] = -100
    adv = torch.randn(B, T, S, dtype=torch.float64)
    ours = pgest.policy_loss(logits, actions, adv)
    ours.backward()
    g, logits.grad = logits.grad.clone(), None
    lp = torch.log_softmax(logits, -1)
    keep = actions != -100
    picked = lp.gather(-1, actions.clamp_min(0))
    ref = -(adv * picked * keep).sum() / keep.sum()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g, logits.grad)
    with pytest.raises(ValueError, match="advantages must have shape"):
        pgest.policy_loss(logits, actions, adv[..., 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 1003), (40, 120001)])
def test_same_bits_on_every_instruction_set(dtype, shape):
    """The vector loads and (streaming) stores differ per instruction set; the
    numbers must not (beyond the baseline copy's missing FMA)."""
    from pgest import _C

    logits, actions, adv = _inputs(shape, dtype, requires_grad=False)
    isa = _C.cpu_isa()
    grads = {}
    try:
        for name in ["generic", "avx2", "avx512"]:
            if not _C.set_cpu_isa(name):
                continue
            x = logits.clone().requires_grad_()
            loss = pgest.policy_loss(x, actions, adv, entropy_weight=0.05)
            loss.backward()
            grads[name] = (loss.detach(), x.grad)
    finally:
        _C.set_cpu_isa(isa)
    fma = [v for k, v in grads.items() if k != "generic"]
    for loss, grad in fma[1:]:  # AVX2 and AVX-512: the same fused multiply-adds
        assert torch.equal(loss, fma[0][0]) and torch.equal(grad, fma[0][1])
    if "generic" in grads and fma:  # no FMA there: one rounding more per step
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grads["generic"][1], fma[0][1], rtol=rtol, atol=atol)
