"""The registered torch.ops.pgest.* ops are public: a bad argument raises a
TypeError, ValueError or IndexError that names it, never AttributeError,
a bare IndexError from the implementation, or a silently wrong number."""
import pytest
import torch

import pgest  # noqa: F401  (registers the ops)

ops = torch.ops.pgest
R, K, H = 4, 6, 3
X = torch.randn(R, K)
A = torch.randint(0, K, (R, 1))
W = torch.randn(R, 1)
ST = torch.stack([X.amax(-1), torch.logsumexp(X, -1) - X.amax(-1)])
ENT = torch.rand(R)
HID, WT, B = torch.randn(R, H), torch.randn(K, H), torch.randn(K)
ST3 = torch.zeros(3, R)
TF = (torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64), torch.full((1,), 0.9, dtype=torch.float64),
      torch.zeros(1, dtype=torch.float64))  # temperature, top_k, top_p, min_p

CASES = [
    ("policy_loss stats without entropy", lambda: ops.policy_loss(X, A, W, 0.1, -100, ST, None), ValueError,
     "stats and entropy go together"),
    ("policy_loss entropy without stats", lambda: ops.policy_loss(X, A, W, 0.1, -100, None, ENT), ValueError,
     "stats and entropy go together"),
    ("policy_loss no weights", lambda: ops.policy_loss(X, A, None, 0.1, -100, None, None), TypeError, "weights"),
    ("policy_loss NaN entropy_weight", lambda: ops.policy_loss(X, A, W, float("nan"), -100, None, None), ValueError,
     "entropy_weight"),
    ("policy_loss_backward no grad_loss", lambda: ops.policy_loss_backward(None, X, A, W, ST, ENT, 0.1, -100),
     TypeError, "grad_loss"),
    ("policy_loss_backward int grad_loss",
     lambda: ops.policy_loss_backward(torch.ones(R, dtype=torch.int64), X, A, W, ST, ENT, 0.1, -100), TypeError,
     "grad_loss"),
    ("policy_loss_backward inf entropy_weight",
     lambda: ops.policy_loss_backward(torch.ones(R), X, A, W, ST, ENT, float("inf"), -100), ValueError,
     "entropy_weight"),
    ("log_prob_backward no stats", lambda: ops.log_prob_backward(None, ENT, X, A, None, ENT, -100), TypeError,
     "stats"),
    ("log_prob_backward no entropy", lambda: ops.log_prob_backward(None, ENT, X, A, ST, None, -100), TypeError,
     "entropy"),
    ("linear_log_prob_backward no stats",
     lambda: ops.linear_log_prob_backward(None, ENT, HID, WT, B, A, None, -100, 1.0, 2, 2, [True] * 3), TypeError,
     "stats"),
    ("linear_log_prob_backward short needs",
     lambda: ops.linear_log_prob_backward(None, ENT, HID, WT, B, A, ST3, -100, 1.0, 2, 2, [True]), ValueError,
     "needs must hold 3 flags"),
    ("linear_log_prob_backward long needs",
     lambda: ops.linear_log_prob_backward(None, ENT, HID, WT, B, A, ST3, -100, 1.0, 2, 2, [True] * 4), ValueError,
     "needs must hold 3 flags"),
    ("linear_policy_loss no advantages",
     lambda: ops.linear_policy_loss(HID, WT, B, A, None, 0.0, -100, 1.0, "mean", 2, 2, [True] * 3), TypeError,
     "advantages"),
    ("linear_truncated_log_prob int temperature",
     lambda: ops.linear_truncated_log_prob(HID, WT, B, A, -100, *TF[1:2], *TF[1:], None, 4096), ValueError,
     "temperature must be a"),
    ("linear_truncated_log_prob short threshold",
     lambda: ops.linear_truncated_log_prob(HID, WT, B, A, -100, *TF, torch.zeros(R - 1), 4096), ValueError,
     "threshold must be"),
    ("linear_truncated_log_prob no hidden",
     lambda: ops.linear_truncated_log_prob(None, WT, B, A, -100, *TF, None, 4096), TypeError, "hidden"),
    ("linear_truncated_log_prob_backward no stats",
     lambda: ops.linear_truncated_log_prob_backward(None, ENT, HID, WT, B, A, None, ENT, ENT, -100, *TF, 4096,
                                                    [True] * 3), TypeError, "stats"),
    ("linear_truncated_log_prob_backward short needs",
     lambda: ops.linear_truncated_log_prob_backward(None, ENT, HID, WT, B, A, ST, ENT, ENT, -100, *TF, 4096,
                                                    [True]), ValueError, "needs must hold 3 flags"),
    ("linear_truncated_sample float seed",
     lambda: ops.linear_truncated_sample(HID, WT, B, *TF, 1, torch.zeros(2), 4096), (TypeError, ValueError), "seed"),
    ("linear_truncated_sample zero budget",
     lambda: ops.linear_truncated_sample(HID, WT, B, *TF, 1, torch.zeros(2, dtype=torch.int64), 0), ValueError,
     "budget"),
    ("gae no values", lambda: ops.gae(torch.randn(5, 2), None, torch.zeros(5, 2), 0.9, 0.9, None), TypeError,
     "values"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_name_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fake_kernels_check_needs_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        h, w, a, st = (mode.from_tensor(t) for t in (HID, WT, A, ST3))
        with pytest.raises(ValueError, match="needs must hold 3 flags"):
            ops.linear_log_prob_backward(None, None, h, w, None, a, st, -100, 1.0, 2, 2, [True, False])
