"""pgest.sample against torch.distributions.Categorical and the reference."""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES, devices, on_each_device

import pgest
from pgest import reference

STAT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@devices()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(37, 11), (5, 7, 300), (3, 4097)])
def test_log_prob_and_entropy_match_categorical(dtype, shape, device):
    logits = (torch.randn(shape) * 3).to(dtype)
    logits[..., 2] = -math.inf
    s = pgest.sample(logits.to(device), num_samples=4, generator=torch.Generator(device).manual_seed(0))
    assert s.actions.shape == shape[:-1] + (4,) and s.entropy.shape == shape[:-1]
    actions = s.actions.cpu()
    d = torch.distributions.Categorical(logits=logits.double())
    expected = d.log_prob(actions.movedim(-1, 0)).movedim(0, -1)
    torch.testing.assert_close(s.log_prob.double().cpu(), expected, rtol=STAT_TOL[dtype], atol=STAT_TOL[dtype])
    torch.testing.assert_close(s.entropy.double().cpu(), d.entropy(), rtol=STAT_TOL[dtype], atol=STAT_TOL[dtype])
    assert (actions != 2).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_draws_match_reference_and_reinforce_grad(dtype):
    B, K, S = 200, 1000, 3
    x = (torch.randn(B, K) * 2).to(dtype)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    s = pgest.sample(x, num_samples=S, generator=g)
    g.set_state(state)
    seed, offset = pgest.philox.next_seed_offset(g, x.device, S)
    u = pgest.philox.uniforms(B, S, seed, offset)
    ref = reference.sample_inverse_cdf(x, u)
    assert (s.actions != ref).any(1).sum() <= 2
    # the same generator state draws the same actions in every op
    g.set_state(state)
    rg = pgest.reinforce_grad(x, reward_table=torch.zeros(K), num_samples=S, generator=g)
    assert torch.equal(rg.actions, s.actions)


@on_each_device
def test_single_sample_shapes_and_no_grad():
    x = torch.randn(2, 3, 5, requires_grad=True)
    s = pgest.sample(x)
    assert s.actions.shape == (2, 3) and s.log_prob.shape == (2, 3) and s.entropy.shape == (2, 3)
    assert not s.log_prob.requires_grad
    empty = pgest.sample(torch.empty(0, 4))
    assert empty.actions.shape == (0,)


@on_each_device
def test_errors_name_the_row():
    x = torch.randn(2, 3, 8)
    x[1, 2, 5] = math.nan
    with pytest.raises(ValueError, match=r"logits\[1, 2, 5\] is nan"):
        pgest.sample(x)
    x = torch.randn(4, 8)
    x[3] = -math.inf
    with pytest.raises(ValueError, match=r"logits\[3\] is all -inf"):
        pgest.sample(x)
    with pytest.raises(ValueError, match="K = 0"):
        pgest.sample(torch.empty(3, 0))
    with pytest.raises(ValueError, match="num_samples"):
        pgest.sample(torch.randn(3, 4), num_samples=0)
    with pytest.raises(TypeError, match="logits must be float"):
        pgest.sample(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        pgest.sample(torch.tensor(1.0))


def test_opcheck():
    x = torch.randn(6, 300)
    seed = pgest.philox.seed_tensor(None, x.device)
    torch.library.opcheck(pgest.ops.sample.sample_op, (x, 3, seed))


@pytest.mark.parametrize("profile", ["rising", "late_jump"])
@on_each_device
def test_entropy_when_the_max_moves_between_chunks(profile):
    K = 3000
    base = torch.linspace(-40.0, 8.0, K) if profile == "rising" else \
        torch.cat([torch.full((K - 100,), -70.0), torch.linspace(0.0, 3.0, 100)])
    logits = base + torch.randn(8, K) * 0.5
    s = pgest.sample(logits)
    d = torch.distributions.Categorical(logits=logits.double())
    torch.testing.assert_close(s.entropy.double(), d.entropy(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s.log_prob.double(), d.log_prob(s.actions), rtol=2e-5, atol=2e-5)


@on_each_device
def test_zero_rows_and_zero_actions():
    # (0, 0) logits: nothing to draw and nothing wrong (was "cannot reshape tensor of 0 elements")
    s = pgest.sample(torch.empty(0, 0))
    assert s.actions.shape == (0,) and s.entropy.shape == (0,)
    loss = pgest.policy_loss(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0), reduction="sum")
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="K = 0"):
        pgest.sample(torch.empty(2, 0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("K,tiny_at", [(20, 16), (32, 16), (48, 32), (300, 288), (5000, 4100)])
def test_rounding_gap_is_spread_by_mass_not_handed_to_one_entry(K, tiny_at, device):
    # The walk over a chunk's recomputed exponentials (double sums) and the
    # chunk mass (float lanes) differ in the last bits; a uniform near 1 lands
    # in that gap on many rows. Here the chunk's last live group starts with a
    # token of probability ~1e-36 relative to the row: it must never be drawn
    # (the gap used to go to that group's first entry: thousands of draws).
    from pgest.ops.sample import sample_native

    torch.manual_seed(0)
    R = 4000
    x = torch.rand(R, K) * -1.0
    x[:, tiny_at] = -82.0
    x[:, tiny_at + 1:] = float("-inf")
    xd = x.to(device)
    for u in (1 - 2**-40, 1 - 2**-30, 1 - 2**-26, 1 - 2**-24):
        a = sample_native(xd, 1, 0, uniforms=torch.full((R, 1), u, dtype=torch.float64, device=device))[0].view(-1)
        assert (a < tiny_at).all(), (u, int((a == tiny_at).sum()))
    # away from the gap the draws are the exact inverse CDF's (float64 reference)
    u = torch.rand(R, 1, dtype=torch.float64) * 0.999
    a = sample_native(xd, 1, 0, uniforms=u.to(device))[0].view(-1).cpu()
    want = reference.sample_inverse_cdf(x, u).view(-1)
    assert (a != want).sum() <= 2
