"""Fuzzing every public op over shapes, strides, dtypes and values (hypothesis,
bounded in examples and derandomised so CI stays fast and reproducible).

Each example either raises a Python exception of the documented kinds, and
then only when the input is invalid, or returns what a float64 PyTorch
reference gives for the same input. No example may crash the process."""
import math
import os

import pytest
import torch

import pgest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("PGEST_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=not os.environ.get("PGEST_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))
ERRORS = (ValueError, IndexError, TypeError)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@st.composite
def logits_cases(draw, allow_bad=True):
    rows = draw(st.sampled_from([0, 1, 2, 3, 5]))
    K = draw(st.sampled_from([1, 2, 3, 16, 17, 40, 257, 600]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    offset = draw(st.sampled_from([0.0, -50.0, 1e3])) if dtype in (torch.float32, torch.float64) else 0.0
    x = torch.randn(rows, K, generator=g, dtype=torch.float64) * scale + offset
    if allow_bad and rows and draw(st.booleans()):
        kind = draw(st.sampled_from(["-inf", "nan", "+inf", "row -inf"]))
        r = draw(st.integers(0, rows - 1))
        c = draw(st.integers(0, K - 1))
        if kind == "row -inf":
            x[r] = -math.inf
        else:
            x[r, c] = {"-inf": -math.inf, "nan": math.nan, "+inf": math.inf}[kind]
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "strided":
        x = torch.stack([x, x], -1)[..., 0]
    return x


def ref_stats(x):
    x64 = x.double()
    lsm = x64.log_softmax(-1)
    p = lsm.exp()
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
    return lsm, ent


def bad_rows(x):
    """Rows a reading op must refuse: a NaN or +inf entry, or all -inf."""
    x64 = x.double()
    return (torch.isnan(x64) | (x64 == math.inf)).any(-1) | (x64 == -math.inf).all(-1)


def close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)


@FUZZ
@given(x=logits_cases(), S=st.integers(1, 3), data=st.data())
def test_log_prob_and_gradient(x, S, data):
    R, K = x.shape
    acts = data.draw(st.lists(st.integers(-3, K + 2) | st.just(-100), min_size=R * S, max_size=R * S))
    actions = torch.tensor(acts, dtype=torch.int64).view(R, S)
    x = x.detach().requires_grad_()
    live = ((actions != -100).any(1)) if R else torch.zeros(0, dtype=torch.bool)
    out_of_range = ((actions != -100) & ((actions < 0) | (actions >= K))).any()
    expect_error = bool(out_of_range) or bool((bad_rows(x) & live).any())
    try:
        lp, ent = pgest.log_prob(x, actions)
    except ERRORS:
        assert expect_error
        return
    assert not expect_error
    lsm, ref_ent = ref_stats(x.detach())
    keep = actions != -100
    ref_lp = torch.where(keep, lsm.gather(1, actions.clamp(0, K - 1)), torch.zeros(()).double())
    close(lp, ref_lp, x.dtype)
    close(ent[live], ref_ent[live], x.dtype)
    # gradients only where every used log-probability is finite
    if not torch.isfinite(lp).all():
        return
    w = torch.randn(R, S, dtype=torch.float64)
    v = torch.randn(R, dtype=torch.float64)
    ((lp.double() * w).sum() + (ent.double() * v).sum()).backward()
    x64 = x.detach().double().requires_grad_()
    lsm64 = x64.log_softmax(-1)
    p = lsm64.exp()
    ent64 = -(p * torch.where(p > 0, lsm64, torch.zeros_like(lsm64))).sum(-1)
    lp64 = torch.where(keep, lsm64.gather(1, actions.clamp(0, K - 1)), torch.zeros(()).double())
    ((lp64 * w).sum() + (ent64 * v * live).sum()).backward()
    tol = 10 * TOL[x.dtype] if x.dtype in (torch.float16, torch.bfloat16) else TOL[x.dtype]
    ref_grad = x64.grad.to(x.dtype).double()  # the gradient is rounded to the logits' dtype once
    ref_grad[~live] = 0.0  # padding rows are not read and get no gradient
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=tol, atol=tol)


@FUZZ
@given(x=logits_cases(), S=st.integers(1, 3))
def test_sample(x, S):
    expect_error = bool(bad_rows(x).any()) if x.shape[0] else False
    try:
        s = pgest.sample(x, num_samples=S, generator=torch.Generator().manual_seed(0))
    except ERRORS:
        assert expect_error
        return
    assert not expect_error
    lsm, ent = ref_stats(x)
    a = s.actions.view(x.shape[0], S)
    assert ((a >= 0) & (a < x.shape[1])).all()
    chosen = lsm.gather(1, a)
    assert (chosen > -math.inf).all(), "an impossible action was drawn"
    close(s.log_prob.view_as(chosen), chosen, x.dtype)
    close(s.entropy, ent, x.dtype)


@FUZZ
@given(x=logits_cases(), S=st.integers(1, 3), baseline=st.sampled_from([None, 0.5, "mean", "rloo", "tensor"]),
       table=st.booleans())
def test_reinforce_grad(x, S, baseline, table):
    R, K = x.shape
    if baseline == "rloo" and S == 1:
        S = 2
    g = torch.Generator().manual_seed(1)
    reward_table = torch.rand(R, K, generator=g) if table else None
    labels = None if table else torch.randint(0, K, (R,), generator=g)
    b = torch.rand(R, generator=g) if baseline == "tensor" else baseline
    x = torch.log_softmax(x.float(), -1).to(x.dtype) if x.shape[1] else x
    expect_error = bool(bad_rows(x).any()) if R else False
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pgest.reinforce_grad(x, labels, reward_table=reward_table, baseline=b, num_samples=S)
    except ERRORS:
        assert expect_error
        return
    assert not expect_error
    a = out.actions.view(R, S)
    r = (reward_table.gather(1, a) if table else (a == labels.view(-1, 1)).float()).double()
    torch.testing.assert_close(out.rewards.view(R, S).double(), r)
    if baseline is None:
        base = torch.zeros_like(r)
    elif baseline == 0.5:
        base = torch.full_like(r, 0.5)
    elif baseline == "mean":
        base = torch.full_like(r, r.mean().item())
    elif baseline == "rloo":
        base = (r.sum(1, keepdim=True) - r) / (S - 1)
    else:
        base = b.double().view(-1, 1).expand_as(r)
    ref = torch.zeros(R, K, dtype=torch.float64)
    ref.scatter_add_(1, a, (base - r) / (R * S))
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.grad.double(), ref.to(x.dtype).double(), rtol=tol, atol=1e-12)


@FUZZ
@given(x=logits_cases(), beta=st.sampled_from([0.0, 0.01, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_policy_loss(x, beta, reduction):
    R, K = x.shape
    g = torch.Generator().manual_seed(2)
    actions = torch.randint(0, max(K, 1), (R,), generator=g)
    adv = torch.randn(R, generator=g)
    x = x.detach().requires_grad_()
    expect_error = bool(bad_rows(x).any()) if R else False
    try:
        loss = pgest.policy_loss(x, actions, adv, entropy_weight=beta, reduction=reduction)
    except ERRORS:
        assert expect_error
        return
    assert not expect_error
    lsm, ent = ref_stats(x.detach())
    lp = lsm.gather(1, actions.view(-1, 1)).squeeze(1) if R else lsm.new_zeros(0)
    per_row = torch.where(adv != 0, -adv.double() * lp, torch.zeros(()).double()) - beta * ent
    ref = {"mean": per_row.mean() if R else per_row.sum() * math.nan, "sum": per_row.sum(), "none": per_row}[reduction]
    close(loss, ref, x.dtype)


@FUZZ
@given(T=st.integers(0, 6), B=st.integers(0, 4), dtype=st.sampled_from([torch.float32, torch.float64]),
       gamma=st.floats(0, 1), lam=st.floats(0, 1), seed=st.integers(0, 1000), poison=st.booleans())
def test_gae_and_returns(T, B, dtype, gamma, lam, seed, poison):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    d = torch.rand(T, B, generator=g) < 0.3
    last = torch.randn(B, generator=g, dtype=torch.float64)
    if poison and T > 1 and B:
        d[0, 0] = True
        r[1, 0] = math.nan  # after the done: must not reach step 0
    adv, ret = pgest.gae(r.to(dtype), v.to(dtype), d, gamma, lam, last.to(dtype))
    G = pgest.discounted_returns(r.to(dtype), d, gamma, last.to(dtype))
    r, v, last = r.to(dtype).double(), v.to(dtype).double(), last.to(dtype).double()
    ref_adv = torch.zeros(T, B, dtype=torch.float64)
    ref_G = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        a_next, v_next, g_next = 0.0, float(last[b]), float(last[b])
        for t in reversed(range(T)):
            done = bool(d[t, b])
            delta = float(r[t, b]) - float(v[t, b]) + (0.0 if done else gamma * v_next)
            a_next = delta + (0.0 if done else gamma * lam * a_next)
            g_next = float(r[t, b]) + (0.0 if done else gamma * g_next)
            ref_adv[t, b], ref_G[t, b], v_next = a_next, g_next, float(v[t, b])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(adv.double(), ref_adv, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(ret.double(), ref_adv + v, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(G.double(), ref_G, rtol=tol, atol=tol, equal_nan=True)


@FUZZ
@given(x=logits_cases(allow_bad=False))
def test_categorical(x):
    if x.shape[0] == 0:
        return
    d = pgest.Categorical(logits=x)
    a = d.sample(generator=torch.Generator().manual_seed(3)) if "generator" in d.sample.__code__.co_varnames \
        else d.sample()
    lsm, ent = ref_stats(x)
    close(d.log_prob(a), lsm.gather(1, a.view(-1, 1)).squeeze(1), x.dtype)
    close(d.entropy(), ent, x.dtype)
    with pytest.raises(IndexError):
        d.log_prob(torch.full_like(a, x.shape[1]))


@st.composite
def head_cases(draw):
    """Hidden states and a head whose logits may hold NaN, +inf, -inf
    entries or whole -inf rows, in any vocabulary tile: finite values stay
    small, so the tiles' products and the materialised one agree on which
    entries are not finite (IEEE: inf - inf and inf * 0 are NaN in any order)."""
    N = draw(st.sampled_from([0, 1, 2, 3, 5]))
    H = draw(st.sampled_from([1, 2, 5]))
    V = draw(st.sampled_from([1, 2, 3, 7, 33]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["h", "w", "b", "row"]))
        value = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
        if kind == "h" and N:
            h[draw(st.integers(0, N - 1)), draw(st.integers(0, H - 1))] = value
        elif kind == "w":
            w[draw(st.integers(0, V - 1)), draw(st.integers(0, H - 1))] = value
        elif kind == "b" and b is not None:
            b[draw(st.integers(0, V - 1))] = value
        elif kind == "row" and b is not None:
            b[:] = -math.inf  # every logit -inf
    tiles = dict(token_tile=draw(st.sampled_from([1, 2, 64])), vocab_tile=draw(st.sampled_from([1, 2, 5, 256])))
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), tiles


@FUZZ
@given(case=head_cases(), S=st.integers(1, 2))
def test_linear_head_ops(case, S):
    # A token tile whose first bad row was all -inf in one vocabulary tile
    # once hid a +inf row behind it: the sampler then walked off the row.
    h, w, b, tiles = case
    # the head keeps 16-bit inputs' logits as the float32 products
    f = (lambda t: t.float()) if h.dtype in (torch.float16, torch.bfloat16) else (lambda t: t)
    x = f(h) @ f(w).T + (f(b) if b is not None else 0)
    bad = bool(bad_rows(x).any()) if x.numel() else False
    gen = torch.Generator().manual_seed(5)
    try:
        s = pgest.linear_sample(h, w, bias=b, num_samples=S, generator=gen, **tiles)
    except ERRORS:
        assert bad
        for fn in (lambda: pgest.linear_log_prob(h, w, torch.zeros(h.shape[0], dtype=torch.long), bias=b, **tiles),
                   lambda: pgest.linear_policy_loss(h, w, torch.zeros(h.shape[0], dtype=torch.long),
                                                    torch.ones(h.shape[0]), bias=b, **tiles)):
            with pytest.raises(ERRORS):
                fn()
        return
    assert not bad
    actions = s.actions.view(h.shape[0], S)
    assert ((actions >= 0) & (actions < w.shape[0])).all()
    lsm, ent = ref_stats(x)
    if h.shape[0]:
        assert (lsm.gather(1, actions) > -math.inf).all()  # never a masked token
        close(s.log_prob.view(-1, S), lsm.gather(1, actions), torch.bfloat16 if h.dtype == torch.bfloat16 else x.dtype)
    lp = pgest.linear_log_prob(h, w, s.actions, bias=b, **tiles)
    assert torch.equal(lp.log_prob, s.log_prob) and torch.equal(lp.entropy, s.entropy)
    loss = pgest.linear_policy_loss(h, w, s.actions, torch.ones(s.actions.shape), bias=b, reduction="sum", **tiles)
    torch.testing.assert_close(loss, -lp.log_prob.sum(), rtol=1e-5, atol=1e-5)


@FUZZ
@given(x=logits_cases(allow_bad=False), S=st.integers(1, 2), data=st.data())
def test_second_derivatives_and_padding_ids_inside_the_vocabulary(x, S, data):
    # create_graph=True through log_prob and policy_loss, with ignore_index
    # anywhere (0, an id inside the vocabulary, or outside): a Hessian-vector
    # product against float64 torch
    R, K = x.shape
    ii = data.draw(st.sampled_from([-100, 0, K - 1, K // 2]))
    acts = data.draw(st.lists(st.integers(0, K - 1) | st.just(ii), min_size=R * S, max_size=R * S))
    actions = torch.tensor(acts, dtype=torch.int64).view(R, S)
    keep = actions != ii
    live = keep.any(1)
    x64 = x.detach().double()
    w = torch.randn(R, S, dtype=torch.float64)
    v = torch.randn(R, K, dtype=torch.float64)

    def ref(t):
        lsm = t.log_softmax(-1)
        p = lsm.exp()
        ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
        lp = torch.where(keep, lsm.gather(1, torch.where(keep, actions, 0)), torch.zeros(()).double())
        return (lp * w).sum() + (torch.where(live, ent, torch.zeros(()).double()) * 0.3).sum()

    def mine(t):
        lp, ent = pgest.log_prob(t, actions, ignore_index=ii)
        return (lp.double() * w).sum() + (ent.double() * 0.3).sum()

    def policy(t):
        return pgest.policy_loss(t, actions, w, entropy_weight=0.3, ignore_index=ii, reduction="sum").double()

    def policy_ref(t):
        lsm = t.log_softmax(-1)
        p = lsm.exp()
        ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
        lp = torch.where(keep, lsm.gather(1, torch.where(keep, actions, 0)), torch.zeros(()).double())
        return (-(lp * w).sum(1) - 0.3 * torch.where(live, ent, torch.zeros(()).double())).sum()

    for f, fr in ((mine, ref), (policy, policy_ref)):
        t = x64.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), t, allow_unused=True, materialize_grads=True)
        tr = x64.clone().requires_grad_()
        (gr,) = torch.autograd.grad(fr(tr), tr, create_graph=True)
        (hvr,) = torch.autograd.grad((gr * v).sum(), tr, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(hv, hvr, rtol=1e-8, atol=1e-10)


@FUZZ
@given(rows=st.integers(0, 4), T=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       mode=st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
       density=st.sampled_from([0.0, 0.3, 1.0]))
def test_objectives_with_masked_poison_and_all_masked(rows, T, seed, dtype, mode, density):
    # whatever masked positions hold (NaN, inf, an old log-prob of -100),
    # the loss and the gradients are those of the unmasked tokens alone, and
    # all-masked inputs give 0, never NaN
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, T, generator=g) < density
    lp = (-torch.rand(rows, T, generator=g, dtype=torch.float64) * 3)
    old = lp - 0.1 * torch.randn(rows, T, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, T, generator=g, dtype=torch.float64)
    poison = [math.nan, math.inf, -100.0]
    lp_p, old_p, adv_p = lp.clone(), old.clone(), adv.clone()
    for i, t in enumerate((lp_p, old_p, adv_p)):
        t[~mask] = poison[i]
    x = lp_p.to(dtype).requires_grad_()
    loss, metrics = pgest.objectives.ppo_loss(x, old_p.to(dtype), adv_p.to(dtype), mask=mask, aggregation=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert all(torch.isfinite(m) for m in metrics.values())
    # the same tokens with harmless values where masked: the same loss
    y = lp.to(dtype).requires_grad_()
    ref, _ = pgest.objectives.ppo_loss(y, old.to(dtype), adv.to(dtype), mask=mask, aggregation=mode)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, y.grad)
    if not mask.any():
        assert loss.item() == 0.0
