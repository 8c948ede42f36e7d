"""Second derivatives (backward with create_graph=True) through every
differentiable op, eager and registered routes, against the same formulas in
torch ops: Hessians, gradgradcheck, and a gradient penalty through a network.
Before they were supported the eager route returned zeros silently."""
import pytest
import torch
from helpers import devices, gen, head_case

import pgest

torch.manual_seed(0)
X = torch.randn(3, 5, dtype=torch.float64) * 2
X[1, 2] = float("-inf")  # a masked action: p log p = 0, no NaN in either derivative
A = torch.tensor([1, 4, 0])
ADV = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)


def _ref_rows(x, a=A):
    ls = torch.log_softmax(x, -1)
    ent = -(ls.exp() * ls.masked_fill(ls == float("-inf"), 0.0)).sum(-1)
    return ls.gather(-1, a[..., None]).squeeze(-1), ent


# each case: (pgest's loss, the same loss in torch ops), as functions of (logits, actions, advantages)
CASES = {
    "log_prob": (lambda x, a, adv: (lambda o: (o.log_prob * adv).sum() + (o.entropy ** 2).sum())(pgest.log_prob(x, a)),
                 lambda x, a, adv: (lambda o: (o[0] * adv).sum() + (o[1] ** 2).sum())(_ref_rows(x, a))),
    "entropy": (lambda x, a, adv: pgest.entropy(x).sum(), lambda x, a, adv: _ref_rows(x, a)[1].sum()),
    "policy_loss": (lambda x, a, adv: pgest.policy_loss(x, a, adv, entropy_weight=0.3),
                    lambda x, a, adv: (lambda o: (-adv * o[0] - 0.3 * o[1]).mean())(_ref_rows(x, a))),
    "policy_loss none": (lambda x, a, adv: (pgest.policy_loss(x, a, adv, reduction="none") ** 2).sum(),
                         lambda x, a, adv: ((-adv * _ref_rows(x, a)[0]) ** 2).sum()),
    "Categorical": (lambda x, a, adv: (lambda d: d.log_prob(a).sum() + d.entropy().sum())(pgest.Categorical(logits=x)),
                    lambda x, a, adv: (lambda d: d.log_prob(a).sum() + d.entropy().sum())(
                        torch.distributions.Categorical(logits=x))),
    "Categorical after sample": (
        lambda x, a, adv: (lambda d: (lambda s: d.log_prob(s).sum() + d.entropy().sum())(
            d.sample(generator=gen(1, x.device))))(pgest.Categorical(logits=x)),
        lambda x, a, adv: (lambda s: (lambda o: o[0].sum() + o[1].sum())(_ref_rows(x, s)))(
            pgest.sample(x.detach(), generator=gen(1, x.device)).actions)),
}


@devices()
@pytest.mark.parametrize("name", list(CASES))
def test_hessian_matches_torch(name, device):
    mine, ref = CASES[name]
    x, a, adv = X.to(device), A.to(device), ADV.to(device)
    want = torch.autograd.functional.hessian(lambda t: ref(t, a, adv), x)
    got = torch.autograd.functional.hessian(lambda t: mine(t, a, adv), x)
    assert want.abs().max() > 0.05  # a real second derivative, not a zero one
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-10, atol=1e-12)


@devices()
def test_registered_ops_differentiate_twice(device):
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randint(0, 6, (4, 2), device=device)
    a[1, 0] = -100
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.pgest.log_prob(t, a, -100)[:2], (x,))
    w = torch.randn(4, 2, dtype=torch.float64, device=device)
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.pgest.policy_loss(t, a, w, 0.2, -100, None, None)[0],
                                        (x,))
    assert torch.autograd.gradgradcheck(lambda t: pgest.log_prob(t, a), (x,))


def test_gradient_penalty_through_a_network():
    # the trial's case: || d loss / d inputs ||^2 through a two-layer network
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()
    inp = torch.randn(6, 4, dtype=torch.float64)
    a = torch.randint(0, 5, (6,))
    adv = torch.randn(6, dtype=torch.float64)

    def penalty(loss_fn):
        net.zero_grad()
        i = inp.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(net(i)), i, create_graph=True)
        g.square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    got = penalty(lambda x: pgest.policy_loss(x, a, adv, entropy_weight=0.1))
    want = penalty(lambda x: (lambda o: (-adv * o[0] - 0.1 * o[1]).mean())(_ref_rows(x, a)))
    assert max(w.abs().max() for w in want) > 1e-3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_head_second_derivatives(reduction):
    torch.manual_seed(4)
    N, H, V = 5, 3, 9
    h, w, b, a, adv = head_case(N, H, V, pad=2)
    keep = a != -100

    def ref(h, w, b):
        ls = torch.log_softmax((h @ w.T + b) / 0.8, -1)
        lp = torch.where(keep, ls.gather(1, a.clamp_min(0)[:, None]).squeeze(1), 0.0)
        ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
        per = -adv * lp - 0.2 * ent
        return {"mean": per.sum() / keep.sum(), "sum": per.sum(), "none": (per ** 2).sum()}[reduction]

    def mine(h, w, b):
        out = pgest.linear_policy_loss(h, w, a, adv, bias=b, temperature=0.8, entropy_weight=0.2,
                                       reduction=reduction, vocab_tile=4)
        return (out ** 2).sum() if reduction == "none" else out

    want = torch.autograd.functional.hessian(ref, (h, w, b))
    got = torch.autograd.functional.hessian(mine, (h, w, b))
    for gr, wr in zip(got, want):
        for g, x in zip(gr, wr):
            torch.testing.assert_close(g, x, rtol=1e-9, atol=1e-12)
    ins = [t.clone().requires_grad_() for t in (h, w, b)]
    assert torch.autograd.gradgradcheck(lambda *t: pgest.linear_log_prob(t[0], t[1], a, bias=t[2]), ins)
