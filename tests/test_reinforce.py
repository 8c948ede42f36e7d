"""pgest.reinforce: its gradient is the seed's steps 1-4 through log_softmax;
its mean over draws is the exact gradient of -E[reward]; baselines lower the
variance without bias."""
import math

import pytest
import torch
from helpers import devices, on_each_device

import pgest


def _seed_gradient(logits, actions, rewards, baseline_values, entropy_weight):
    """Steps 1-4 of the seed in autograd, for given (B, S) actions and rewards."""
    x = logits.detach().double().requires_grad_()
    log_probs = torch.log_softmax(x, -1)
    B, S = actions.shape
    grad = torch.zeros_like(log_probs).scatter_add_(1, actions, (baseline_values - rewards).double() / (B * S))
    log_probs.backward(grad, retain_graph=True)
    reg = entropy_weight * torch.sum(log_probs * torch.exp(log_probs)) / B
    reg.backward()
    return x.grad


@pytest.mark.parametrize("baseline", [None, 0.25, "tensor", "mean", "rloo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reward_kind", ["labels", "table"])
@devices()
def test_gradient_is_the_seeds(baseline, dtype, reward_kind, device):
    B, K, S = 40, 33, 3
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, K, generator=g) * 2).to(dtype).requires_grad_()
    kw = {"labels": torch.randint(0, K, (B,), generator=g)} if reward_kind == "labels" else \
        {"reward_table": torch.randn(B, K, generator=g)}
    b = torch.rand(B, generator=g) if baseline == "tensor" else baseline
    on_device = {k: v.to(device) for k, v in kw.items()}
    b_on_device = b.to(device) if isinstance(b, torch.Tensor) else b
    out = pgest.reinforce(logits.to(device), baseline=b_on_device, num_samples=S, entropy_weight=0.05, **on_device)
    out.loss.backward()
    out = out._replace(actions=out.actions.cpu(), rewards=out.rewards.cpu())
    rewards = out.rewards.double()
    bvals = pgest.reference.baseline_values(rewards, b)
    expected = _seed_gradient(logits, out.actions, rewards, bvals, 0.05)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-3}[dtype]
    torch.testing.assert_close(logits.grad.double(), expected, rtol=tol * 10, atol=tol)
    if reward_kind == "labels":
        assert torch.equal(out.rewards, (out.actions == kw["labels"][:, None]).to(out.rewards.dtype))


def test_draws_match_reinforce_grad_and_its_gradient():
    """reinforce (logits level) and reinforce_grad (log-prob level) draw the
    same actions for the same generator state, and backpropagating
    reinforce_grad's one-hot gradient through log_softmax gives reinforce's."""
    B, K = 64, 500
    logits = torch.randn(B, K, requires_grad=True)
    labels = torch.randint(0, K, (B,))
    out = pgest.reinforce(logits, labels, baseline="mean", num_samples=2, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    log_probs = torch.log_softmax(logits.detach().requires_grad_(), -1)
    rg = pgest.reinforce_grad(log_probs, labels, baseline="mean", num_samples=2,
                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(rg.actions, out.actions)
    log_probs.backward(rg.grad)
    x = log_probs.grad_fn.next_functions[0][0].variable
    torch.testing.assert_close(x.grad, logits.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("baseline", [None, "mean", "rloo", "value"])
def test_mean_gradient_is_exact_gradient_of_expected_reward(baseline):
    """Over 40k rows of one policy, the mean per-row gradient equals
    -(p*R - p (p.R)) within 5 standard errors per entry."""
    K, B, S = 5, 40000, 2
    logits = torch.tensor([0.3, -1.0, 1.5, 0.0, -0.2], dtype=torch.float64)
    R = torch.tensor([1.0, -0.5, 0.2, 0.8, 0.0], dtype=torch.float64)
    p = torch.softmax(logits, 0)
    b = torch.full((B,), float(p @ R), dtype=torch.float64) if baseline == "value" else baseline
    x = logits.expand(B, K).clone().requires_grad_()
    out = pgest.reinforce(x, reward_table=R, baseline=b, num_samples=S, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    per_row = x.grad * B
    est, se = per_row.mean(0), per_row.std(0) / math.sqrt(B)
    exact = -(p * R - p * (p @ R))
    assert ((est - exact).abs() <= 5 * se + 1e-12).all(), (est, exact, se)


def test_baselines_lower_the_variance():
    K, B, S = 5, 20000, 4
    logits = torch.tensor([0.3, -1.0, 1.5, 0.0, -0.2])
    R = torch.tensor([1.0, -0.5, 0.2, 0.8, 0.0]) + 5.0
    p = torch.softmax(logits.double(), 0)
    var = {}
    for name, b in [("none", None), ("mean", "mean"), ("rloo", "rloo"),
                    ("value", torch.full((B,), float(p @ R.double())))]:
        x = logits.expand(B, K).clone().requires_grad_()
        pgest.reinforce(x, reward_table=R, baseline=b, num_samples=S,
                        generator=torch.Generator().manual_seed(5)).loss.backward()
        var[name] = (x.grad * B).var(0).sum().item()
    for name in ["mean", "rloo", "value"]:
        assert var[name] < 0.1 * var["none"], var


@on_each_device
def test_token_level_shapes():
    B, T, K, S = 3, 4, 50, 2
    logits = torch.randn(B, T, K, requires_grad=True)
    labels = torch.randint(0, K, (B, T))
    out = pgest.reinforce(logits, labels, num_samples=S, baseline=torch.zeros(B, T))
    assert out.actions.shape == (B, T, S) and out.rewards.shape == (B, T, S)
    assert out.log_prob.shape == (B, T, S) and out.entropy.shape == (B, T)
    out.loss.backward()
    assert logits.grad.shape == (B, T, K)


def test_forward_reads_logits_once_and_saves_no_copy():
    R, K = 32, 2048
    logits = torch.randn(R, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pgest.reinforce(logits, torch.zeros(R, dtype=torch.long), num_samples=4, entropy_weight=0.1)
    big = [t for t in saved if t.numel() >= R * K]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    out.loss.backward()


def test_compile_fullgraph():
    logits = torch.randn(16, 64, requires_grad=True)
    labels = torch.randint(0, 64, (16,))

    def step(x, y):
        return pgest.reinforce(x, y, baseline="rloo", num_samples=2, entropy_weight=0.01).loss

    loss = torch.compile(step, fullgraph=True)(logits, labels)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(), ValueError, "exactly one of labels and reward_table"),
        (dict(labels=torch.tensor([0, 7, 1])), IndexError, r"labels\[1\] = 7"),
        (dict(labels=torch.tensor([0, 1])), ValueError, r"labels must have shape \(3,\)"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels must be an integer"),
        (dict(reward_table=torch.ones(3, 4)), ValueError, "reward_table must have shape"),
        (dict(reward_table=torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0]), num_samples=40), ValueError, r"reward_table\[1\] is nan"),
        (dict(labels=torch.tensor([0, 1, 2]), baseline="rloo"), ValueError, "num_samples >= 2"),
        (dict(labels=torch.tensor([0, 1, 2]), baseline="avg"), ValueError, "'avg'"),
        (dict(labels=torch.tensor([0, 1, 2]), baseline=torch.tensor([0.0, math.nan, 0.0])), ValueError, r"baseline\[1\] is nan"),
        (dict(labels=torch.tensor([0, 1, 2]), entropy_weight=math.inf), ValueError, "entropy_weight must be finite"),
    ],
)
@on_each_device
def test_bad_arguments(kw, exc, match):
    logits = torch.zeros(3, 5, requires_grad=True)
    with pytest.raises(exc, match=match):
        pgest.reinforce(logits, **kw)


def test_opcheck_reinforce_weights():
    from pgest.ops.reinforce import reinforce_weights_op

    actions = torch.randint(0, 6, (5, 3))
    labels = torch.randint(0, 6, (5,))
    for kind, b in [(0, None), (2, torch.rand(5)), (3, None), (4, None)]:
        torch.library.opcheck(reinforce_weights_op, (actions, labels, None, kind, 0.0, b, 6, [5], torch.float32))
    torch.library.opcheck(reinforce_weights_op, (actions, None, torch.randn(6), 1, 0.5, None, 6, [5], torch.float64))


@on_each_device
def test_registered_reinforce_weights_rejects_bad_arguments():
    # a public op: every argument is checked, as pgest::reinforce_grad checks
    # its own (it once raised AttributeError for no labels and no table, and
    # torch's shape or gather errors for inconsistent sizes)
    op = torch.ops.pgest.reinforce_weights
    a = torch.randint(0, 6, (5, 2))
    labels = torch.randint(0, 6, (5,))
    cases = [
        (lambda: op(a, None, None, 0, 0.0, None, 6, [5], torch.float32), ValueError, "exactly one of labels"),
        (lambda: op(a, labels, torch.randn(6), 0, 0.0, None, 6, [5], torch.float32), ValueError, "exactly one"),
        (lambda: op(a.float(), labels, None, 0, 0.0, None, 6, [5], torch.float32), TypeError, "actions"),
        (lambda: op(a[:, 0], labels, None, 0, 0.0, None, 6, [5], torch.float32), ValueError, "actions must be 2-D"),
        (lambda: op(a, labels[:4], None, 0, 0.0, None, 6, [5], torch.float32), ValueError, "labels must have shape"),
        (lambda: op(a, None, torch.randn(7), 0, 0.0, None, 6, [5], torch.float32), ValueError, "reward_table must"),
        (lambda: op(a, None, torch.randn(5, 7), 0, 0.0, None, 6, [5], torch.float32), ValueError, "reward_table"),
        (lambda: op(a + 6, None, torch.randn(6), 0, 0.0, None, 6, [5], torch.float32), IndexError,
         r"actions\[0, 0\] = \d+ is out of range for 6 actions"),
        (lambda: op(a, labels, None, 7, 0.0, None, 6, [5], torch.float32), ValueError, "baseline_kind"),
        (lambda: op(a, labels, None, 1, float("nan"), None, 6, [5], torch.float32), ValueError, "baseline"),
        (lambda: op(a, labels, None, 2, 0.0, None, 6, [5], torch.float32), ValueError, "baseline tensor"),
        (lambda: op(a, labels, None, 2, 0.0, torch.randn(4), 6, [5], torch.float32), ValueError, "baseline tensor"),
        (lambda: op(a[:, :1], labels, None, 4, 0.0, None, 6, [5], torch.float32), ValueError, "rloo"),
        (lambda: op(a, labels, None, 0, 0.0, None, 0, [5], torch.float32), ValueError, "num_actions"),
        (lambda: op(a, labels, None, 0, 0.0, None, 6, [4], torch.float32), ValueError, "lead"),
        (lambda: op(a, labels, None, 0, 0.0, None, 6, [5], torch.int64), TypeError, "dtype"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # and the good call still gives leave-one-out weights
    r, w = op(a, labels, None, 4, 0.0, None, 6, [5], torch.float64)
    hits = (a == labels[:, None]).double()
    torch.testing.assert_close(r, hits)
    torch.testing.assert_close(w, (hits - hits.flip(1)) / 2)
