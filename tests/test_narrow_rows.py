"""Rows of at most 32 entries go W rows at a time, one row per vector lane
(csrc/cpu/narrow_rows.h). Each row must get the same bits as on the
row-at-a-time path, which a strided copy of the same logits takes (column
stride 2), and the same draws as the inverse-CDF reference."""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES, each_isa, on_each_device

import pgest
from pgest import reference
from pgest.ops.sample import sample_native

ROWS = 16 * 3 + 5  # whole groups for W = 4, 8, 16, and a tail


def strided_copy(x):
    """The same values with column stride 2: the row-at-a-time path."""
    s = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)[..., ::2]
    s.copy_(x)
    assert s.stride(-1) == 2 and torch.equal(s, x)
    return s


def logits_of(K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, K, generator=g) * 4
    x[1] += 3e4 if dtype == torch.float16 else 1e6  # a large common offset
    x[3] = 0.0  # ties everywhere
    if K > 1:
        x[2, 0] = -math.inf
        x[4, 1:] = -math.inf  # one live entry
    x[5] -= 50.0
    return x.to(dtype)


def bits(*ts):
    return [t.view(torch.int64) if t.dtype == torch.float64 else t.view(torch.int32) if t.dtype == torch.float32
            else t for t in ts]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 6, 9, 16, 17, 18, 25, 32])
def test_sample_same_bits_as_row_path(dtype, K):
    x = logits_of(K, dtype)
    for name, (narrow, rowwise) in each_isa(lambda: (sample_native(x, 1, 1234), sample_native(strided_copy(x), 1,
                                                                                              1234))).items():
        for a, b in zip(bits(*narrow), bits(*rowwise)):
            assert torch.equal(a, b), (name, K, dtype)


@pytest.mark.parametrize("K", [2, 5, 16, 18, 32])
def test_sample_draws_match_reference(K):
    x = torch.randn(4000, K) * 2
    u = pgest.philox.uniforms(4000, 1, 99, 0)
    actions, lp, ent, _ = sample_native(x, 1, 99, uniforms=u)
    ref = reference.sample_inverse_cdf(x, u)
    assert (actions != ref).sum() <= 2  # a uniform within float rounding of a CDF step
    d = torch.distributions.Categorical(logits=x.double())
    torch.testing.assert_close(lp.double(), d.log_prob(actions.view(-1)).view(-1, 1), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ent.double(), d.entropy(), rtol=2e-6, atol=2e-6)


def test_sample_chi_square_at_two_actions():
    """p = (0.2, 0.8) in every row: 20000 draws, 0.2 +- 5 standard errors."""
    x = torch.log(torch.tensor([[0.2, 0.8]])).expand(20000, 2).contiguous()
    a = pgest.sample(x, generator=torch.Generator().manual_seed(5)).actions
    frac = (a == 0).double().mean().item()
    assert abs(frac - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20000)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 7, 16, 18, 32])
@pytest.mark.parametrize("S", [1, 3])
def test_log_prob_forward_and_backward_same_bits_as_row_path(dtype, K, S):
    x = logits_of(K, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    actions = torch.randint(0, K, (ROWS, S), generator=g)
    actions[7] = -100  # a row of padding inside a group
    actions[9, 0] = -100
    w_lp = torch.randn(ROWS, S, generator=g)
    w_h = torch.randn(ROWS, generator=g)

    def run(logits):
        z = logits.clone().requires_grad_() if logits.is_contiguous() else logits.detach().requires_grad_()
        lp, ent = pgest.log_prob(z, actions)
        ((lp * w_lp).sum() + (ent * w_h).sum()).backward()
        return lp.detach(), ent.detach(), z.grad

    for name, (narrow, rowwise) in each_isa(lambda: (run(x), run(strided_copy(x)))).items():
        for a, b in zip(bits(*narrow), bits(*rowwise)):
            assert torch.equal(a, b), (name, K, S, dtype)
    lp, ent, grad = narrow
    assert torch.equal(lp[7], torch.zeros(S)) and torch.equal(grad[7], torch.zeros(K, dtype=dtype))
    assert torch.equal(ent[7], torch.zeros(()))


def test_against_log_softmax_in_float64():
    x = logits_of(6, torch.float64, seed=3)
    x = x.clone().requires_grad_()
    actions = torch.randint(0, 6, (ROWS,), generator=torch.Generator().manual_seed(4))
    actions[2] = 1  # not the -inf entry
    lp, ent = pgest.log_prob(x, actions)
    (lp.sum() + 0.3 * ent.sum()).backward()
    y = x.detach().clone().requires_grad_()
    ls = torch.log_softmax(y, -1)
    ent_ref = -(ls.exp() * ls.nan_to_num(neginf=0.0)).sum(-1)
    lp_ref = ls.gather(1, actions.view(-1, 1)).view(-1)
    (lp_ref.sum() + 0.3 * ent_ref.sum()).backward()
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@on_each_device
def test_bad_row_inside_a_group_is_reported(bad):
    x = torch.randn(ROWS, 4)
    x[21, 2] = bad
    with pytest.raises(ValueError, match=r"logits\[21, 2\]"):
        pgest.sample(x)
    with pytest.raises(ValueError, match=r"logits\[21, 2\]"):
        pgest.log_prob(x, torch.zeros(ROWS, dtype=torch.int64))
    x[21] = -math.inf
    with pytest.raises(ValueError, match=r"logits\[21\] is all -inf"):
        pgest.sample(x)


@on_each_device
def test_bad_action_inside_a_group_is_reported():
    x = torch.randn(ROWS, 4, requires_grad=True)
    actions = torch.zeros(ROWS, dtype=torch.int64)
    actions[18] = 4
    with pytest.raises(IndexError, match=r"actions\[18\] = 4 is out of range for 4 actions"):
        pgest.log_prob(x, actions)
    actions[18] = 0
    lp, ent = pgest.log_prob(x, actions)
    loss = lp.sum() + ent.sum()
    actions2 = actions.clone()
    actions2[40] = 9
    # the backward checks the actions again (the registered op, called directly)
    from pgest.ops.log_prob import log_prob_op
    lp2, ent2, st = log_prob_op(x.detach(), actions.view(-1, 1), None)
    with pytest.raises(IndexError, match=r"actions\[40\] = 9"):
        torch.ops.pgest.log_prob_backward(torch.ones(ROWS, 1), None, x.detach(), actions2.view(-1, 1), st, ent2,
                                          None)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [2, 5, 16, 18, 32])
@pytest.mark.parametrize("baseline", [None, "mean", 0.25])
def test_reinforce_grad_same_bits_as_row_path(dtype, K, baseline):
    x = torch.randn(ROWS, K, generator=torch.Generator().manual_seed(K)).log_softmax(-1).to(dtype)
    labels = torch.randint(0, K, (ROWS,), generator=torch.Generator().manual_seed(1))
    table = torch.rand(ROWS, K, generator=torch.Generator().manual_seed(2))

    def run(lp):
        a = pgest.reinforce_grad(lp, labels, baseline=baseline, generator=torch.Generator().manual_seed(7))
        b = pgest.reinforce_grad(lp, reward_table=table, generator=torch.Generator().manual_seed(8))
        return a + b

    for name, (narrow, rowwise) in each_isa(lambda: (run(x), run(strided_copy(x)))).items():
        for a, b in zip(narrow, rowwise):
            assert torch.equal(a, b), (name, K, dtype)


@on_each_device
def test_reinforce_grad_errors_inside_a_group():
    x = torch.randn(ROWS, 4).log_softmax(-1)
    labels = torch.zeros(ROWS, dtype=torch.int64)
    labels[19] = 4
    with pytest.raises(IndexError, match=r"labels\[19\] = 4"):
        pgest.reinforce_grad(x, labels)
    table = torch.zeros(ROWS, 4)
    table[35] = math.inf  # whichever action row 35 draws
    with pytest.raises(ValueError, match=r"reward_table\[35, \d\] is inf"):
        pgest.reinforce_grad(x, reward_table=table)
    x[22, 1] = math.nan
    with pytest.raises(ValueError, match=r"\[22, 1\] is nan"):
        pgest.reinforce_grad(x, torch.zeros(ROWS, dtype=torch.int64))


@pytest.mark.parametrize("K", [3, 16, 18])
def test_row_stride_threads_and_batch_shape_do_not_change_the_bits(K):
    """Rows with a row stride other than K (a slice of a wider tensor) still
    go W at a time; a thread split that cuts groups at other rows, and
    leading dimensions, give the same bits."""
    R = 16 * 125 + 7  # past threads_for's threshold: 2 threads split it at row 1003
    wide = torch.randn(R, K + 5, generator=torch.Generator().manual_seed(9)) * 3
    x = wide[:, :K]
    assert x.stride() == (K + 5, 1)
    ref = sample_native(x.contiguous(), 1, 77)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for a, b in zip(bits(*sample_native(x, 1, 77)), bits(*ref)):
                assert torch.equal(a, b), n
    finally:
        torch.set_num_threads(threads)
    actions = torch.randint(0, K, (R,), generator=torch.Generator().manual_seed(1))
    w = wide.clone().requires_grad_()
    lp, ent = pgest.log_prob(w[:, :K], actions)
    (lp.sum() + ent.sum()).backward()
    z = x.contiguous().view(1, R, K).clone().requires_grad_()
    lp3, ent3 = pgest.log_prob(z, actions.view(1, R))
    (lp3.sum() + ent3.sum()).backward()
    for a, b in zip(bits(lp, ent, w.grad[:, :K].contiguous()), bits(lp3.view(-1), ent3.view(-1), z.grad.view(R, K))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("K", [1, 5, 100])
@pytest.mark.parametrize("u", [math.nan, 1.0, 1.5, -0.5, math.inf])
def test_given_uniforms_out_of_range_stay_in_the_row(K, u):
    # Uniforms handed to the kernel (the linear head's placement) outside
    # [0, 1) used to walk past the row's end (a crash); they are pinned to
    # Philox's range: below 0 or NaN as 0, from 1 up as the largest below 1.
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(K))
    got = sample_native(x, 1, 0, uniforms=torch.full((40, 1), u, dtype=torch.float64))[0].view(-1)
    pinned = 0.0 if not u >= 0 else min(u, 1 - 2**-53)
    want = sample_native(x, 1, 0, uniforms=torch.full((40, 1), pinned, dtype=torch.float64))[0].view(-1)
    assert torch.equal(got, want) and ((got >= 0) & (got < K)).all()
