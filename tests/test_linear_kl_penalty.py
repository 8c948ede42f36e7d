"""pgest.linear_kl_penalty against the two models' materialised logits in float64."""
import pytest
import torch

import pgest


def _heads(seed=0, N=7, H=6, V=300):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(N, H), mk(V, H), mk(V), mk(N, H), mk(V, H) * 1.3, mk(V), torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_matches_the_materialised_formula(estimator):
    h, w, b, rh, rw, rb, a = _heads()
    a[2] = -100
    T = 0.8
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    out = pgest.linear_kl_penalty(ours[0], ours[1], rh, rw, a, bias=ours[2], ref_bias=rb, estimator=estimator,
                                  temperature=T, softcap=3.0)
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    z = 3.0 * torch.tanh((ref[0] @ ref[1].T + ref[2]) / 3.0) / T
    ls, rls = z.log_softmax(-1), ((rh @ rw.T + rb) / T).log_softmax(-1)
    keep = a != -100
    lp = torch.where(keep, ls.gather(1, a.clamp(min=0)[:, None])[:, 0], 0.0)
    rlp = torch.where(keep, rls.gather(1, a.clamp(min=0)[:, None])[:, 0], 0.0)
    d = rlp - lp
    want = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[estimator]
    torch.testing.assert_close(out.kl, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ref_log_prob, rlp, rtol=1e-12, atol=1e-12)
    assert out.kl[2] == 0 and not out.ref_log_prob.requires_grad
    (out.kl.sum() + 0.1 * out.entropy.sum()).backward()
    ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    (want.sum() + 0.1 * ent.sum()).backward()
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    if estimator == "k3":  # an independent fact: k3 is never negative, and 0 against itself
        assert (out.kl >= 0).all()
        same = pgest.linear_kl_penalty(h, w, h, w, a, bias=b, ref_bias=b)
        assert (same.kl == 0).all()


def test_errors():
    h, w, b, rh, rw, rb, a = _heads()
    with pytest.raises(ValueError, match="estimator must be one of"):
        pgest.linear_kl_penalty(h, w, rh, rw, a, estimator="k4")
    with pytest.raises(ValueError, match="same tokens"):
        pgest.linear_kl_penalty(h, w, rh[:3], rw, a)
