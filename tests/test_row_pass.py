"""The CPU row pass (csrc/cpu/row_stats.h) at its edges, under every
instruction set: its exponential at the floor below which it flushes to 0,
rows whose largest entry is a signed zero, and rows whose running max climbs
in every chunk or jumps past the pass's optimistic range. AVX-512 builds the
exponential from other instructions than AVX2 (a masked scale by 2^n, a
clamp by max), so the two must agree bit for bit, and both with float64."""
import math

import pytest
import torch
from helpers import each_isa

import pgest

EXP_FLOOR = -87.0  # math.h: kExpFloor


def bits(t):
    return t.view(torch.int64) if t.dtype == torch.float64 else t.view(torch.int32) if t.dtype == torch.float32 else t


def score(x, actions):
    """log-probs of every column, entropy, and the gradient of the first
    action's log-prob (minus the probabilities off the action)."""
    xr = x.clone().requires_grad_(True)
    lp = pgest.log_prob(xr, actions)
    lp.log_prob.sum().backward()
    every = pgest.log_prob(x, torch.arange(x.shape[-1]).expand(x.shape[0], -1)).log_prob
    draws = pgest.sample(x, 4, generator=torch.Generator().manual_seed(5))
    return every, lp.entropy, xr.grad, draws.actions


def same_bits_every_isa(out):
    ref_name = "avx512" if "avx512" in out else "avx2" if "avx2" in out else None
    if ref_name is None:
        return
    for name, got in out.items():
        if name == "generic":  # no fused multiply-add: may differ in the last bit
            continue
        for a, b in zip(got, out[ref_name]):
            assert torch.equal(bits(a), bits(b)), name


def test_exponential_at_the_floor():
    # One row: its max 0, then scores from below the floor to just under 0,
    # with the floor itself and its float neighbours, and -inf.
    K = 30001
    floor = torch.tensor(EXP_FLOOR)
    edge = torch.stack([torch.nextafter(floor, torch.tensor(-math.inf)), floor, torch.nextafter(floor, torch.tensor(0.0))])
    rest = torch.linspace(-88.0, -1e-3, K - 1 - 4)
    x = torch.cat([torch.zeros(1), edge, torch.tensor([-math.inf]), rest]).float()[None]
    out = each_isa(lambda: score(x, torch.zeros(1, dtype=torch.long)))
    same_bits_every_isa(out)
    for name, (every, _, grad, _) in out.items():
        d = every[0, 1:].double()  # the kernel's own x - max - log Z, in which the backward takes exp
        p = -grad[0, 1:].double()
        live = d >= EXP_FLOOR
        assert live.sum() > 0 and (~live).sum() > 2
        assert (p[~live] == 0).all(), name  # flushed below the floor (and exp(-inf) = 0)
        assert (p[live] > 0).all(), name  # never flushed above it
        ref = torch.exp(d[live])
        assert ((p[live] - ref).abs() / ref).max().item() <= 2.0 ** -23, name  # within an ulp of exp


def test_signed_zero_maxima():
    # The largest entry is 0 with both signs, in lanes and chunks in both
    # orders; the vector max that picks a lane must give the walk's result.
    K = 1000
    rows = torch.full((6, K), -3.0)
    rows[0] = 0.0
    rows[1] = -0.0
    rows[2, ::2] = -0.0
    rows[2, 1::2] = 0.0
    rows[3, ::3] = 0.0
    rows[3, 1::3] = -0.0
    rows[4, 700] = -0.0
    rows[4, 3] = 0.0
    rows[5, 17] = -0.0
    out = each_isa(lambda: score(rows, torch.zeros(6, dtype=torch.long)))
    same_bits_every_isa(out)
    ref = torch.log_softmax(rows.double(), -1)
    ref_h = -(ref.exp() * ref).sum(-1)
    for name, (every, entropy, _, _) in out.items():
        # all-zero rows: log K exactly as float32 rounds it
        assert torch.equal(every[0], torch.full((K,), -math.log(K)).float()), name
        assert torch.equal(every[1], every[0]), name
        torch.testing.assert_close(every.double(), ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(entropy.double(), ref_h, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_running_max_climbs_and_jumps(dtype):
    g = torch.Generator().manual_seed(0)
    K = 5000
    climb = torch.sort(torch.randn(3, K, generator=g) * 40, dim=1).values  # a new max in every chunk
    jumps = torch.where(torch.rand(3, K, generator=g) < 0.003, 150.0, -5.0) + torch.randn(3, K, generator=g)
    wide = torch.randn(3, K, generator=g) * 60  # the optimistic range (64) passed now and then
    x = torch.cat([climb, jumps, wide]).to(dtype)
    out = each_isa(lambda: score(x, torch.randint(0, K, (9,), generator=torch.Generator().manual_seed(1))))
    same_bits_every_isa(out)
    ref = torch.log_softmax(x.double(), -1)
    ref_h = -(ref.exp() * ref).sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 5e-5
    for name, (every, entropy, _, _) in out.items():
        live = ref > -80
        torch.testing.assert_close(every.double()[live], ref[live], rtol=tol, atol=tol)
        torch.testing.assert_close(entropy.double(), ref_h, rtol=tol, atol=tol)
