"""discounted_returns and gae against plain Python loops and against the
estimator users know from Stable-Baselines3 / CleanRL."""
import itertools

import pytest
import torch
from helpers import devices

import pgest


def returns_loop(r, d, gamma, last):
    T, B = r.shape
    out = torch.empty_like(r)
    for b in range(B):
        g = 0.0 if last is None else float(last[b])
        for t in reversed(range(T)):
            g = float(r[t, b]) + (0.0 if d[t, b] else gamma * g)
            out[t, b] = g
    return out


def gae_sb3(r, v, d, gamma, lam, last):
    """Stable-Baselines3's RolloutBuffer.compute_returns_and_advantage, written
    out: there episode_starts[t + 1] marks that step t ended an episode."""
    T, B = r.shape
    last_v = torch.zeros(B, dtype=r.dtype) if last is None else last
    adv = torch.zeros_like(r)
    last_gae = torch.zeros(B, dtype=r.dtype)
    for step in reversed(range(T)):
        next_non_terminal = 1.0 - d[step].to(r.dtype)  # == 1 - episode_starts[step + 1]
        next_values = last_v if step == T - 1 else v[step + 1]
        delta = r[step] + gamma * next_values * next_non_terminal - v[step]
        last_gae = delta + gamma * lam * next_non_terminal * last_gae
        adv[step] = last_gae
    return adv, adv + v


DONES = ["none", "all", "random"]


def make(T, B, dtype, dones, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(T, B, generator=g).to(dtype)
    v = torch.randn(T, B, generator=g).to(dtype)
    d = {"none": torch.zeros(T, B, dtype=torch.bool), "all": torch.ones(T, B, dtype=torch.bool),
         "random": torch.rand(T, B, generator=g) < 0.2}[dones]
    last = torch.randn(B, generator=g).to(dtype)
    return r, v, d, last


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype,dones,shape,with_last",
                         list(itertools.product([torch.float32, torch.float64], DONES,
                                                [(1, 5), (7, 1), (50, 9), (300, 300)], [False, True])))
@devices()
def test_returns_match_loop(dtype, dones, shape, with_last, device):
    r, _, d, last = make(*shape, dtype, dones)
    last = last if with_last else None
    out = pgest.discounted_returns(r.to(device), d.to(device), 0.97, None if last is None else last.to(device)).cpu()
    torch.testing.assert_close(out, returns_loop(r.double(), d, 0.97, last).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype,dones,shape,with_last",
                         list(itertools.product([torch.float32, torch.float64], DONES,
                                                [(1, 5), (7, 1), (50, 9), (300, 300)], [False, True])))
@devices()
def test_gae_matches_sb3(dtype, dones, shape, with_last, device):
    r, v, d, last = make(*shape, dtype, dones)
    last = last if with_last else None
    adv, ret = (t.cpu() for t in pgest.gae(r.to(device), v.to(device), d.to(device), 0.99, 0.95,
                                           None if last is None else last.to(device)))
    ref_adv, ref_ret = gae_sb3(r.double(), v.double(), d, 0.99, 0.95, None if last is None else last.double())
    torch.testing.assert_close(adv, ref_adv.to(dtype), **TOL[dtype])
    torch.testing.assert_close(ret, ref_ret.to(dtype), **TOL[dtype])


def test_gae_with_lambda_one_is_monte_carlo_advantage():
    r, v, d, last = make(40, 6, torch.float64, "random")
    adv, ret = pgest.gae(r, v, d, 0.9, 1.0, last)
    torch.testing.assert_close(ret, pgest.discounted_returns(r, d, 0.9, last))
    torch.testing.assert_close(adv, pgest.discounted_returns(r, d, 0.9, last) - v)


def test_plain_reward_to_go():
    """gamma = 1, no dones: G_t = sum of the rewards from t on (seed 000)."""
    r = torch.arange(1.0, 6.0).view(5, 1)
    G = pgest.discounted_returns(r, torch.zeros(5, 1, dtype=torch.bool), 1.0)
    assert G.view(-1).tolist() == [15.0, 14.0, 12.0, 9.0, 5.0]


def test_dones_accept_numbers():
    r, v, d, _ = make(10, 3, torch.float32, "random")
    a = pgest.discounted_returns(r, d, 0.5)
    assert torch.equal(a, pgest.discounted_returns(r, d.float(), 0.5))
    assert torch.equal(a, pgest.discounted_returns(r, d.to(torch.uint8), 0.5))


def test_empty():
    assert pgest.discounted_returns(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.bool), 0.9).shape == (0, 3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda r, v, d: pgest.discounted_returns(r, d, 1.5), ValueError, r"gamma must be in \[0, 1\]"),
        (lambda r, v, d: pgest.discounted_returns(r, d, -0.1), ValueError, "gamma"),
        (lambda r, v, d: pgest.gae(r, v, d, 0.9, 2.0), ValueError, r"lam must be in \[0, 1\]"),
        (lambda r, v, d: pgest.discounted_returns(r, d[:3], 0.9), ValueError, "dones must have the shape"),
        (lambda r, v, d: pgest.gae(r, v[:, :2], d, 0.9, 0.9), ValueError, "values must have the shape"),
        (lambda r, v, d: pgest.gae(r, v.double(), d, 0.9, 0.9), TypeError, "values must have the dtype"),
        (lambda r, v, d: pgest.discounted_returns(r[0], d[0], 0.9), ValueError, r"time-major \(T, B\)"),
        (lambda r, v, d: pgest.discounted_returns(r.long(), d, 0.9), TypeError, "float32 or float64"),
        (lambda r, v, d: pgest.discounted_returns(r, d, 0.9, torch.zeros(4)), ValueError, r"last_value must have shape \(3,\)"),
        (lambda r, v, d: pgest.discounted_returns(r, d, "0.9"), TypeError, "gamma must be a float"),
    ],
)
def test_bad_input(call, exc, match):
    r, v, d, _ = make(5, 3, torch.float32, "random")
    with pytest.raises(exc, match=match):
        call(r, v, d)


def test_opcheck():
    r, v, d, last = make(6, 4, torch.float32, "random")
    from pgest.ops.returns import gae_op, returns_op

    torch.library.opcheck(returns_op, (r, d.to(torch.uint8), 0.9, last))
    torch.library.opcheck(gae_op, (r, v, d.to(torch.uint8), 0.9, 0.8, None))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["reward", "value"])
def test_nothing_crosses_a_done(bad, where):
    # A NaN or inf after an episode end (e.g. a reset env's first value) must
    # not reach the steps before it: 0 * NaN is NaN, so the scans must branch.
    r, v, _, last = make(6, 2, torch.float64, "none")
    d = torch.zeros(6, 2, dtype=torch.bool)
    d[2, 0] = True
    (r if where == "reward" else v)[3, 0] = bad
    adv, ret = pgest.gae(r, v, d, 0.9, 0.8, last)
    ref_adv, _ = gae_sb3(r[:3], v[:3], d[:3], 0.9, 0.8, torch.zeros(2, dtype=r.dtype))
    torch.testing.assert_close(adv[:3, 0], ref_adv[:, 0], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(ret[:3, 0]).all()
    g = pgest.discounted_returns(r, d, 0.9, last)
    if where == "reward":
        torch.testing.assert_close(g[:3, 0], returns_loop(r[:3], d[:3], 0.9, None)[:, 0])


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.float32, torch.float64])
def test_dones_dtypes_agree(dtype):
    r, v, d, last = make(40, 17, torch.float32, "random")
    ref = pgest.gae(r, v, d, 0.99, 0.95, last)
    out = pgest.gae(r, v, d.to(dtype), 0.99, 0.95, last)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # any nonzero 8-bit value is a done, as for bool(d)
    if dtype == torch.uint8:
        assert torch.equal(pgest.gae(r, v, d.to(dtype) * 7, 0.99, 0.95, last)[0], ref[0])


def test_values_requiring_grad_are_constants():
    r, v, d, last = make(5, 3, torch.float32, "random")
    v = v.requires_grad_()
    last = last.requires_grad_()
    adv, ret = pgest.gae(r, v, d, 0.9, 0.9, last)
    g = pgest.discounted_returns(r.requires_grad_(), d, 0.9, last)
    assert not adv.requires_grad and not ret.requires_grad and not g.requires_grad
    # the registered op, called directly with a tensor that needs grad, says what to do at backward
    adv2, _ = torch.ops.pgest.gae(r, v, d, 0.9, 0.9, None)
    with pytest.raises(RuntimeError, match="not differentiable.*values.detach"):
        adv2.sum().backward()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        # the registered ops are public: they check shapes themselves (these read out of bounds before)
        (lambda r, v, d: torch.ops.pgest.gae(r, v[:2], d, 0.9, 0.9, None), ValueError, "values must have the shape"),
        (lambda r, v, d: torch.ops.pgest.gae(r, v, d[:, :1], 0.9, 0.9, None), ValueError, "dones must have the shape"),
        (lambda r, v, d: torch.ops.pgest.gae(r, v.double(), d, 0.9, 0.9, None), TypeError, "values must have the dtype"),
        (lambda r, v, d: torch.ops.pgest.gae(r, v, d, 0.9, 0.9, torch.zeros(1)), ValueError, "last_value must have shape"),
        (lambda r, v, d: torch.ops.pgest.gae(r, v, d, 0.9, 7.0, None), ValueError, "lam must be in"),
        (lambda r, v, d: torch.ops.pgest.discounted_returns(r, d[:1], 0.9, None), ValueError, "dones must have the shape"),
        (lambda r, v, d: torch.ops.pgest.discounted_returns(r, d, -1.0, None), ValueError, "gamma must be in"),
        (lambda r, v, d: torch.ops.pgest.discounted_returns(r.half(), d, 0.9, None), TypeError, "float32 or float64"),
        (lambda r, v, d: pgest.discounted_returns(r.to_sparse(), d, 0.9), TypeError, "rewards must be a dense tensor"),
        (lambda r, v, d: pgest.gae(r, v, d.to_sparse(), 0.9, 0.9), TypeError, "dones must be a dense tensor"),
    ],
)
def test_registered_ops_check_their_arguments(call, exc, match):
    r, v, d, _ = make(5, 3, torch.float32, "random")
    with pytest.raises(exc, match=match):
        call(r, v, d)


def test_compile_fullgraph():
    r, v, d, last = make(9, 4, torch.float32, "random")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(r, v, d, last):
        adv, ret = pgest.gae(r, v, d, 0.99, 0.95, last)
        return adv, ret, pgest.discounted_returns(r, d, 0.99, last)

    got = f(r, v, d, last)
    want = pgest.gae(r, v, d, 0.99, 0.95, last) + (pgest.discounted_returns(r, d, 0.99, last),)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
