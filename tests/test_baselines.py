import pytest
import torch

from pgest import baselines


def test_leave_one_out_matches_a_loop():
    r = torch.randn(7, 5, dtype=torch.float64)
    adv = baselines.leave_one_out(r)
    for i in range(7):
        for s in range(5):
            others = torch.cat([r[i, :s], r[i, s + 1:]])
            assert adv[i, s].item() == pytest.approx((r[i, s] - others.mean()).item(), abs=1e-12)


def test_group_normalize():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    adv = baselines.group_normalize(r)
    std = r[0].std()
    torch.testing.assert_close(adv[0], (r[0] - 0.5) / (std + 1e-6))
    assert (adv[1] == 0).all()  # a group with one reward value carries no signal


def test_normalize():
    x = torch.randn(1000, dtype=torch.float64) * 3 + 2
    y = baselines.normalize(x)
    assert abs(y.mean().item()) < 1e-12 and abs(y.std().item() - 1) < 1e-6


def test_moving_average_baseline():
    b = baselines.MovingAverageBaseline(decay=0.9)
    assert b.value == 0.0
    b.update(torch.tensor([1.0, 3.0]))
    assert b.value == 2.0  # the first batch sets it
    b.update(torch.tensor([0.0]))
    assert b.value == pytest.approx(0.9 * 2.0)
    with pytest.raises(ValueError, match="decay"):
        baselines.MovingAverageBaseline(decay=1.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"2-D \(B, S\)"):
        baselines.leave_one_out(torch.ones(5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        baselines.group_normalize(torch.ones(5, 1))
    with pytest.raises(TypeError, match="float"):
        baselines.leave_one_out(torch.ones(5, 2, dtype=torch.long))
