"""torch.func transforms (grad, vmap, jacrev, jacfwd, hessian, per-sample
gradients) and gradcheck's batched gradients over every differentiable op,
against the same functions written in torch ops. They used to raise."""
import pytest
import torch
from helpers import head_case
from torch.autograd import gradcheck
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import pgest

torch.manual_seed(0)
B, R, K = 3, 4, 6
XB = torch.randn(B, R, K, dtype=torch.float64)
XB[0, 1, 2] = float("-inf")
AB = torch.randint(0, K, (B, R))
AB[1, 2] = -100  # ignore_index inside a vmapped batch
ADV = torch.randn(R, dtype=torch.float64)


def _ref_lp(x, a):
    ls = torch.log_softmax(x, -1)
    keep = a != -100
    lp = torch.where(keep, ls.gather(-1, a.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    ent = -(ls.exp() * ls.masked_fill(ls == float("-inf"), 0.0)).sum(-1)
    return lp, torch.where(keep, ent, 0.0)


PAIRS = {
    "log_prob": (lambda x, a: (lambda o: (o.log_prob * ADV).sum() + o.entropy.sum())(pgest.log_prob(x, a)),
                 lambda x, a: (lambda o: (o[0] * ADV).sum() + o[1].sum())(_ref_lp(x, a))),
    "entropy": (lambda x, a: pgest.entropy(x).sum(), lambda x, a: _ref_lp(x, a.clamp_min(0))[1].sum()),
    "policy_loss": (lambda x, a: pgest.policy_loss(x, a, ADV, entropy_weight=0.2),
                    lambda x, a: (lambda o: (-ADV * o[0] - 0.2 * o[1]).sum() / (a != -100).sum())(_ref_lp(x, a))),
    "Categorical": (lambda x, a: (lambda d: d.log_prob(a.clamp_min(0)).sum() + d.entropy().sum())(
        pgest.Categorical(logits=x)), lambda x, a: (lambda o: o[0].sum() + o[1].sum())(_ref_lp(x, a.clamp_min(0)))),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_per_sample_gradients_and_hessians(name):
    mine, ref = PAIRS[name]
    torch.testing.assert_close(vmap(grad(mine))(XB, AB), vmap(grad(ref))(XB, AB), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessian(mine)(XB[2], AB[2]), hessian(ref)(XB[2], AB[2]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(jacrev(jacfwd(mine))(XB[1], AB[1]), hessian(ref)(XB[1], AB[1]), rtol=1e-9, atol=1e-12)


def test_vmap_of_the_forward_folds_the_batch_into_rows():
    lp, ent = vmap(lambda x, a: tuple(pgest.log_prob(x, a)))(XB, AB)
    rlp, rent = _ref_lp(XB, AB)
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(ent, rent)
    # an unbatched argument beside a batched one
    lp2 = vmap(lambda x: pgest.log_prob(x, AB[0]).log_prob)(XB)
    torch.testing.assert_close(lp2, _ref_lp(XB, AB[0].expand(B, R))[0])
    loss = vmap(lambda x, a: pgest.policy_loss(x, a, ADV, reduction="none"))(XB, AB)
    torch.testing.assert_close(loss, -ADV * rlp)


@pytest.mark.parametrize("name", ["log_prob", "entropy", "policy_loss", "Categorical", "Categorical probs"])
def test_gradcheck_with_batched_gradients(name):
    x = torch.randn(R, K, dtype=torch.float64, requires_grad=True)
    a = torch.randint(0, K, (R,))
    fns = {
        "log_prob": lambda x: tuple(pgest.log_prob(x, a)),
        "entropy": lambda x: pgest.entropy(x),
        "policy_loss": lambda x: pgest.policy_loss(x, a, ADV, entropy_weight=0.1, reduction="none"),
        "Categorical": lambda x: pgest.Categorical(logits=x).log_prob(a),
        "Categorical probs": lambda x: pgest.Categorical(probs=x.exp()).log_prob(a),
    }
    assert gradcheck(fns[name], (x,), check_batched_grad=True)


def test_fused_head_under_transforms():
    N, H, V = 5, 3, 7
    h, w, b, a, adv = head_case(N, H, V, pad=1)

    def ref(h, w, b):
        lp, ent = _ref_lp((h @ w.T + b) / 0.7, a)
        return (-(adv * lp).sum() - 0.1 * ent.sum()) / (a != -100).sum()

    def mine(h, w, b):
        return pgest.linear_policy_loss(h, w, a, adv, bias=b, temperature=0.7, entropy_weight=0.1)

    for argnum in range(3):
        torch.testing.assert_close(grad(mine, argnums=argnum)(h, w, b), grad(ref, argnums=argnum)(h, w, b))
    wb = torch.randn(4, V, H, dtype=torch.float64)  # a vmapped weight: per-element gradients
    torch.testing.assert_close(vmap(grad(mine, argnums=1), in_dims=(None, 0, None))(h, wb, b),
                               vmap(grad(ref, argnums=1), in_dims=(None, 0, None))(h, wb, b))
    torch.testing.assert_close(hessian(mine, argnums=0)(h, w, b), hessian(ref, argnums=0)(h, w, b))
    ins = [t.clone().requires_grad_() for t in (h, w, b)]
    assert gradcheck(lambda *t: tuple(pgest.linear_log_prob(t[0], t[1], a, bias=t[2])), ins, check_batched_grad=True)
    assert gradcheck(lambda *t: pgest.linear_policy_loss(t[0], t[1], a, adv, bias=t[2]), ins,
                     check_batched_grad=True)
