import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOAT_DTYPES, devices, on_each_device

import pgest
from pgest.ops.log_prob import log_prob_backward_op, log_prob_op

# log_prob/entropy of 16-bit logits are computed in fp32 from the rounded
# inputs, so compare with the float64 reference on the same rounded values.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def _reference(x64, actions, ignore_index=-100):
    """log_softmax + gather and torch's Categorical entropy, float64."""
    ls = torch.log_softmax(x64, -1)
    a = actions if actions.dim() == x64.dim() else actions.unsqueeze(-1)
    valid = a != ignore_index
    lp = ls.gather(-1, torch.where(valid, a, 0)) * valid
    ent = torch.distributions.Categorical(logits=x64).entropy()
    return (lp if actions.dim() == x64.dim() else lp.squeeze(-1)), ent


@devices()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,S", [((16, 7), None), ((4, 3, 300), None), ((9, 1000), 3), ((5, 1), 2)])
def test_values_and_weighted_gradients_match_log_softmax(dtype, shape, S, device):
    torch.manual_seed(0)
    x_cpu = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    K = shape[-1]
    actions = torch.randint(0, K, shape[:-1] + ((S,) if S else ()))
    xr = x_cpu.detach().to(torch.float64).requires_grad_()
    lp_ref, ent_ref = _reference(xr, actions)
    x = x_cpu.to(device).requires_grad_()
    a = actions.to(device)
    lp, ent = pgest.log_prob(x, a)
    assert lp.shape == actions.shape and ent.shape == shape[:-1] and lp.device == x.device
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp.double().cpu(), lp_ref.detach(), **TOL[dtype])
    torch.testing.assert_close(ent.double().cpu(), ent_ref.detach(), **TOL[dtype])
    w_lp = torch.randn(lp.shape, dtype=torch.float64)
    w_h = torch.randn(ent.shape, dtype=torch.float64)
    for use_lp, use_h in [(True, True), (True, False), (False, True)]:
        x.grad, xr.grad = None, None
        lp, ent = pgest.log_prob(x, a)
        lp_ref, ent_ref = _reference(xr, actions)
        loss = (lp.double().cpu() * w_lp).sum() * use_lp + (ent.double().cpu() * w_h).sum() * use_h
        ref = (lp_ref * w_lp).sum() * use_lp + (ent_ref * w_h).sum() * use_h
        loss.backward()
        ref.backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.double().cpu(), xr.grad, **GRAD_TOL[dtype])


@on_each_device
def test_gradcheck_float64_both_outputs():
    torch.manual_seed(1)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 9, (6, 3))
    actions[2, 1] = -100
    assert torch.autograd.gradcheck(lambda t: pgest.log_prob(t, actions), (x,))
    assert torch.autograd.gradcheck(lambda t: pgest.entropy(t), (x,))


@on_each_device
def test_ignore_index_like_cross_entropy():
    torch.manual_seed(2)
    x = torch.randn(8, 11, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 11, (8,))
    actions[[1, 5]] = -100
    lp, _ = pgest.log_prob(x, actions)
    assert lp[1] == 0 and lp[5] == 0
    (-lp.sum() / (actions != -100).sum()).backward()
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, actions, ignore_index=-100).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-14)
    assert (x.grad[1] == 0).all()


@on_each_device
def test_padding_row_is_not_read_and_gets_no_gradient():
    x = torch.randn(3, 5, dtype=torch.float64)
    x[1] = float("nan")  # a padded position: never read
    x.requires_grad_()
    actions = torch.tensor([[0, 2], [-100, -100], [4, -100]])
    lp, ent = pgest.log_prob(x, actions)
    assert ent[1] == 0 and (lp[1] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e6, 1e7])
@on_each_device
def test_large_common_offset_keeps_precision(offset):
    """(x - max) - log Z, never x - (max + log Z): compare with float64
    log_softmax of the same fp32 values."""
    torch.manual_seed(3)
    x = (torch.randn(64, 50) + offset).float()
    actions = torch.randint(0, 50, (64,))
    lp, ent = pgest.log_prob(x, actions)
    lp_ref, ent_ref = _reference(x.double(), actions)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-6)


@on_each_device
def test_uniform_row_at_1e30():
    x = torch.full((1, 5), 1e30, requires_grad=True)
    lp, ent = pgest.log_prob(x, torch.tensor([2]))
    assert abs(lp.item() + math.log(5)) < 1e-6 and abs(ent.item() - math.log(5)) < 1e-6
    (-lp.sum()).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.2, 0.2, -0.8, 0.2, 0.2]]), rtol=0, atol=1e-6)


@on_each_device
def test_non_contiguous_and_strided():
    torch.manual_seed(4)
    base = torch.randn(40, 30, dtype=torch.float64)
    x = base.t()[:, ::2]  # (30, 20) with column stride 60
    actions = torch.randint(0, 20, (30,))
    xg = x.clone().requires_grad_()
    xs = x.detach().requires_grad_()
    lp, ent = pgest.log_prob(xs, actions)
    lp_ref, ent_ref = _reference(xg, actions)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    (lp.sum() + ent.sum()).backward()
    (lp_ref.sum() + ent_ref.sum()).backward()
    torch.testing.assert_close(xs.grad, xg.grad, rtol=1e-10, atol=1e-12)


@on_each_device
def test_minus_inf_entries_and_empty():
    x = torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64, requires_grad=True)
    lp, ent = pgest.log_prob(x, torch.tensor([0]))
    (lp.sum() + ent.sum()).backward()
    assert x.grad[0, 1] == 0 and torch.isfinite(x.grad).all()
    e = torch.empty(0, 4, requires_grad=True)
    lp, ent = pgest.log_prob(e, torch.empty(0, dtype=torch.long))
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert e.grad.shape == (0, 4)


@on_each_device
def test_k_equals_one():
    x = torch.randn(4, 1, requires_grad=True)
    lp, ent = pgest.log_prob(x, torch.zeros(4, dtype=torch.long))
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: pgest.log_prob(torch.randn(3, 4), torch.tensor([0, 4, 1])), IndexError, r"actions\[1\] = 4"),
        (lambda: pgest.log_prob(torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0])), TypeError, "integer"),
        (lambda: pgest.log_prob(torch.randn(3, 4), torch.tensor([0, 1])), ValueError, "shape"),
        (lambda: pgest.log_prob(torch.tensor([[0.0, float("nan")]]), torch.tensor([0])), ValueError, "nan"),
        (lambda: pgest.log_prob(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=2**70), ValueError, "int64"),
        (lambda: pgest.log_prob(torch.randn(3, 4).int(), torch.tensor([0, 1, 1])), TypeError, "float32"),
        (lambda: pgest.log_prob(torch.randn(3, 4), torch.tensor([0, -100, 1]), ignore_index=None), IndexError,
         "out of range"),
    ],
)
@on_each_device
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_actions_changed_between_forward_and_backward_raise():
    """The backward checks every action again: an alias write after the
    forward (no version-counter bump) must raise, not write out of bounds."""
    x = torch.randn(4, 6, requires_grad=True)
    actions = torch.tensor([1, 2, 3, 4])
    lp, _ = pgest.log_prob(x, actions)
    actions.numpy()[2] = 1_000_000
    with pytest.raises(IndexError, match="out of range"):
        lp.sum().backward()


def test_saves_logits_and_row_statistics_only():
    x = torch.randn(32, 1000, requires_grad=True)
    actions = torch.randint(0, 1000, (32,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = pgest.log_prob(x, actions)
    big = [t for t in saved if t.numel() >= 32 * 1000]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= 32 * 4


def test_opcheck_and_compile():
    torch.manual_seed(5)
    x = torch.randn(8, 37, requires_grad=True)
    a = torch.randint(0, 37, (8, 2))
    torch.library.opcheck(log_prob_op, (x, a, -100))
    torch.library.opcheck(log_prob_op, (x, None, None))
    lp, ent, stats = log_prob_op(x.detach(), a, -100)
    torch.library.opcheck(log_prob_backward_op, (torch.ones(8, 2), torch.ones(8), x.detach(), a, stats, ent, -100))
    torch.library.opcheck(log_prob_backward_op, (None, torch.ones(8), x.detach(), a, stats, ent, -100))

    def step(t, acts):
        lp, ent = pgest.log_prob(t, acts)
        return (lp.sum(-1) * 0.5 + 0.1 * ent).sum()

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, a)
    out.backward()
    g, x.grad = x.grad.clone(), None
    ref = step(x, a)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, x.grad)


def test_registered_op_rejects_what_it_cannot_index():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="actions must be 2-D"):
        torch.ops.pgest.log_prob(x, torch.zeros(3, 1, dtype=torch.long), -100)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.pgest.log_prob(x, torch.full((4, 1), 7), -100)
    lp, ent, stats = torch.ops.pgest.log_prob(x, torch.zeros(4, 1, dtype=torch.long), -100)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.pgest.log_prob_backward(torch.ones(4, 1), None, x, torch.full((4, 1), -5), stats, ent, -100)
    with pytest.raises(ValueError, match="stats"):
        torch.ops.pgest.log_prob_backward(None, torch.ones(4), x, None, stats[:, :2], ent, -100)


@on_each_device
def test_policy_loss_is_minus_weighted_log_prob():
    """policy_loss runs on the same kernels: its value and gradient equal
    -adv * log_prob - beta * H written with log_prob."""
    torch.manual_seed(6)
    x = torch.randn(10, 13, dtype=torch.float64, requires_grad=True)
    a = torch.randint(0, 13, (10, 2))
    adv = torch.randn(10, 2, dtype=torch.float64)
    loss = pgest.policy_loss(x, a, adv, entropy_weight=0.05, reduction="sum")
    (g1,) = torch.autograd.grad(loss, x)
    lp, ent = pgest.log_prob(x, a)
    ref = (-(adv * lp).sum(-1) - 0.05 * ent).sum()
    (g2,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


@on_each_device
def test_many_actions_per_row_group_like_a_bincount():
    # S above the pairwise limit of action_groups.h: the one-hot part of the
    # gradient is grouped by sorting; it must equal a bincount of g_s.
    torch.manual_seed(3)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    a = torch.randint(0, 9, (4, 300))
    a[1, ::7] = -100
    lp, _ = pgest.log_prob(x, a)
    w = torch.randn(4, 300, dtype=torch.float64)
    (lp * w).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ls = ref_x.log_softmax(-1)
    keep = a != -100
    ref = (ls.gather(1, a.clamp(min=0)) * w * keep).sum()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)


def test_sparse_and_uint64_inputs_get_a_message():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="logits must be a dense tensor"):
        pgest.log_prob(x.to_sparse(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="actions must be a dense tensor"):
        pgest.log_prob(x, torch.zeros(3, dtype=torch.long).to_sparse())
    with pytest.raises(IndexError, match=r"actions\[1\] = 18446744073709551615 is out of range"):
        pgest.log_prob(x, torch.tensor([0, 2**64 - 1, 1], dtype=torch.uint64))
    lp, _ = pgest.log_prob(x, torch.tensor([0, 3, 1], dtype=torch.uint64))
    torch.testing.assert_close(lp, x.log_softmax(-1).gather(1, torch.tensor([[0], [3], [1]])).squeeze(1))


@on_each_device
def test_backward_op_checks_upstream_shapes():
    from pgest.ops.log_prob import log_prob_backward_op, log_prob_op

    x = torch.randn(5, 4)
    a = torch.randint(0, 4, (5, 2))
    lp, ent, st = log_prob_op(x, a, -100)
    with pytest.raises(ValueError, match=r"grad_log_prob must have shape \(5, 2\)"):
        log_prob_backward_op(torch.ones(3), None, x, a, st, ent, -100)
    with pytest.raises(ValueError, match=r"grad_entropy must have shape \(5,\)"):
        log_prob_backward_op(None, torch.ones(5, 1), x, a, st, ent, -100)
    # a broadcast upstream gradient (stride 0) is read in place and equals the dense one
    g_b = log_prob_backward_op(torch.ones(()).expand(5, 2), torch.full((), 0.5).expand(5), x, a, st, ent, -100)
    g_d = log_prob_backward_op(torch.ones(5, 2), torch.full((5,), 0.5), x, a, st, ent, -100)
    assert torch.equal(g_b, g_d)


@pytest.mark.slow
def test_a_row_of_more_than_2_31_entries():
    # One row of 2^31 + 4096 entries: the chunk masses are summed in float64,
    # so log_prob and entropy stay at float rounding (a serial float32 sum of
    # 2^23 chunk masses was 5-8% off). The row repeats a 256-entry pattern, so
    # the float64 reference is the pattern's sums times the repeat count.
    period = 256
    reps = (2**31 + 4096) // period
    K = reps * period
    pattern = torch.linspace(-3.0, 0.0, period).to(torch.bfloat16)
    x = pattern.repeat(reps).view(1, K)
    p64 = pattern.double()
    e = p64.exp()
    Z = reps * e.sum()
    log_z = Z.log()
    H = log_z - reps * (e * p64).sum() / Z
    a = torch.tensor([K - 1, 7])
    lp, ent = pgest.log_prob(x, a.view(1, 2))
    torch.testing.assert_close(lp.double().view(2), p64[[period - 1, 7]] - log_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), H.view(1), rtol=1e-6, atol=1e-6)
    s = pgest.sample(x, num_samples=64, generator=torch.Generator().manual_seed(0))
    assert ((s.actions >= 0) & (s.actions < K)).all()
    # the draws spread over the row (64 draws: both halves hit but with p ~ 2^-63)
    assert (s.actions > K // 2).any() and (s.actions < K // 2).any()
