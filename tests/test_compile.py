"""torch.compile's contract for every registered op and public function:
fake kernels agree with the real ones on shapes, dtypes and strides (opcheck,
with transposed inputs among them), and every public op compiles with
fullgraph=True and dynamic=True and gives the eager numbers."""
import pytest
import torch

import pgest
from pgest.linear.head import linear_log_prob_backward_op, linear_log_prob_op, linear_sample_op
from pgest.linear.policy_loss import linear_policy_loss_op
from pgest.ops.log_prob import log_prob_backward_op, log_prob_op
from pgest.ops.policy_loss import policy_loss_backward_op, policy_loss_op
from pgest.ops.reinforce import reinforce_weights_op
from pgest.ops.reinforce_grad import reinforce_grad_op
from pgest.ops.returns import gae_op, returns_op
from pgest.ops.sample import sample_op

N, H, V = 6, 4, 10


def _t(x):
    """The same values with transposed strides (a (n, m) view of an (m, n) tensor)."""
    return x.T.contiguous().T


def _row_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g, requires_grad=True)
    a = torch.randint(0, V, (N, 2), generator=g)
    w = torch.randn(N, 2, generator=g)
    m = x.detach().amax(-1)
    st = torch.stack([m, torch.logsumexp(x.detach() - m[:, None], -1)])
    ent = torch.distributions.Categorical(logits=x.detach()).entropy()
    return x, a, w, st, ent


def _head_inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    wt = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    a = torch.randint(0, V, (N, 2), generator=g)
    return h, wt, b, a


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_every_registered_op(layout):
    f = (lambda t: t) if layout == "contiguous" else _t
    x, a, w, st, ent = _row_inputs()
    xd = f(x.detach()).requires_grad_()
    torch.library.opcheck(log_prob_op, (xd, f(a), -100))
    torch.library.opcheck(log_prob_backward_op, (f(torch.ones(N, 2)), torch.ones(N), f(x.detach()), f(a), st, ent, -100))
    torch.library.opcheck(policy_loss_op, (xd, f(a), f(w), 0.1, -100, None, None))
    torch.library.opcheck(policy_loss_backward_op, (torch.ones(N), f(x.detach()), f(a), f(w), st, ent, 0.1, -100))
    torch.library.opcheck(sample_op, (f(x.detach()), 3, torch.tensor([5, 0])))
    torch.library.opcheck(reinforce_grad_op, (f(x.detach().log_softmax(-1)), a[:, 0], None, 3, 0.0, None, 2,
                                                torch.tensor([5, 0])))
    torch.library.opcheck(reinforce_weights_op, (f(a), a[:, 0], None, 3, 0.0, None, V, [N], torch.float32))
    torch.library.opcheck(reinforce_weights_op, (f(a), None, f(torch.randn(N, V)), 0, 0.0, None, V, [N], torch.float64))
    h, wt, b, ha = _head_inputs()
    hd, wd = f(h.detach()).requires_grad_(), f(wt.detach()).requires_grad_()
    torch.library.opcheck(linear_log_prob_op, (hd, wd, b, f(ha), -100, 1.0, 4, 3))
    _, _, hst = linear_log_prob_op(h.detach(), wt.detach(), b.detach(), ha, -100, 1.0, 4, 3)
    torch.library.opcheck(linear_log_prob_backward_op, (f(torch.ones(N, 2)), torch.ones(N), f(h.detach()),
                                                     f(wt.detach()), b.detach(), f(ha), hst, -100, 1.0, 4, 3,
                                                     [True, True, True]))
    torch.library.opcheck(linear_policy_loss_op, (hd, wd, b, f(ha), f(torch.randn(N, 2)), 0.1, -100, 1.0, "mean",
                                                    4, 3, [True, True, True]))
    torch.library.opcheck(linear_sample_op, (f(h.detach()), f(wt.detach()), b.detach(), 0.7, 3,
                                               torch.tensor([5, 0]), 4, 3))
    r = f(torch.randn(5, 3))
    torch.library.opcheck(returns_op, (r, torch.zeros(5, 3), 0.9, None))
    torch.library.opcheck(gae_op, (r, f(torch.randn(5, 3)), torch.zeros(5, 3), 0.9, 0.95, None))


def _public_steps():
    x, a, w, _, _ = _row_inputs()
    h, wt, b, ha = _head_inputs()
    adv = w[:, 0]
    lab = a[:, 0]
    return {
        "log_prob": (lambda x: sum(t.sum() for t in pgest.log_prob(x, a)), (x,)),
        "entropy": (lambda x: pgest.entropy(x).sum(), (x,)),
        "policy_loss": (lambda x: pgest.policy_loss(x, lab, adv, entropy_weight=0.1), (x,)),
        "Categorical": (lambda x: (lambda d: d.log_prob(lab).sum() + d.entropy().sum())(pgest.Categorical(logits=x)),
                        (x,)),
        "sample": (lambda x: pgest.sample(x.detach(), num_samples=2, generator=None).log_prob.sum(), (x,)),
        "reinforce": (lambda x: pgest.reinforce(x, lab, baseline="mean", generator=None).loss, (x,)),
        "reinforce_grad": (lambda x: pgest.reinforce_grad(x.detach().log_softmax(-1), lab, baseline="rloo",
                                                          num_samples=2).grad.sum(), (x,)),
        "Categorical.sample": (lambda x: (lambda d: d.log_prob(d.sample()).sum())(pgest.Categorical(logits=x)), (x,)),
        "gae": (lambda x: sum(t.sum() for t in pgest.gae(x.detach()[:, :4], x.detach()[:, 4:8],
                                                          torch.zeros(N, 4), 0.99, 0.95)), (x,)),
        "discounted_returns": (lambda x: pgest.discounted_returns(x.detach()[:, :4], torch.zeros(N, 4), 0.99).sum(),
                               (x,)),
        "linear_log_prob": (lambda h, w, b: sum(t.sum() for t in pgest.linear_log_prob(h, w, ha, bias=b,
                                                                                           temperature=0.7)),
                            (h, wt, b)),
        "linear_policy_loss": (lambda h, w, b: pgest.linear_policy_loss(h, w, ha, torch.ones(N, 2), bias=b,
                                                                        temperature=0.7, entropy_weight=0.1),
                               (h, wt, b)),
        "linear_sample": (lambda h, w, b: pgest.linear_sample(h.detach(), w.detach(), bias=b.detach(),
                                                              temperature=0.7, generator=None).log_prob.sum(),
                          (h, wt, b)),
    }


@pytest.mark.parametrize("name", list(_public_steps()))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_every_public_op_compiles_fullgraph_dynamic(name, layout):
    fn, ins = _public_steps()[name]
    ins = [(_t(t.detach()) if layout == "transposed" and t.dim() == 2 else t.detach().clone()).requires_grad_()
           for t in ins]
    ref = [t.detach().clone().requires_grad_() for t in ins]
    torch._dynamo.reset()
    torch.manual_seed(3)  # the sampling ops draw from the default generator: the same draws on both routes
    out = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(*ins)
    torch.manual_seed(3)
    want = fn(*ref)
    torch.testing.assert_close(out, want)
    if out.requires_grad:
        out.backward()
        want.backward()
        for x, y in zip(ins, ref):
            torch.testing.assert_close(x.grad, y.grad)


def test_temperature_as_a_compiled_input_with_dynamic_shapes():
    # dynamic=True makes a float input symbolic: the argument checks must not
    # need a concrete value (math.isfinite of a SymFloat failed)
    h, wt, b, ha = _head_inputs()
    adv = torch.randn(N, 2)

    def step(h, w, b, t):
        lp, ent = pgest.linear_log_prob(h, w, ha, bias=b, temperature=t)
        loss = pgest.linear_policy_loss(h, w, ha, adv, bias=b, temperature=t)
        s = pgest.linear_sample(h.detach(), w.detach(), bias=b.detach(), temperature=t, num_samples=2)
        return lp.sum() + ent.sum() + loss + s.log_prob.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for t in (0.7, 1.3):
        torch.manual_seed(4)
        got = compiled(h, wt, b, t)
        torch.manual_seed(4)
        torch.testing.assert_close(got, step(h, wt, b, t))
