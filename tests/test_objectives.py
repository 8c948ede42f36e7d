"""pgest.objectives against plain PyTorch written here, independently, and
hand-computed small cases."""
import math

import pytest
import torch
from helpers import devices

import pgest
from pgest import objectives as obj


def _ppo_plain(lp, old, adv, low, high, dual=None):
    out = []
    for l, o, a in zip(lp.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(l - o)
        v = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
        if dual is not None and a < 0:
            v = min(v, -a * dual)
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def test_ppo_hand_computed_clipping_both_sides():
    # ratios e^0.5 = 1.65 (A > 0: clipped at 1.2), e^-0.5 = 0.61 (A < 0:
    # clipped at 0.8), 1.0 (not clipped)
    lp = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
    loss, m = obj.ppo_loss(lp, old, adv, clip=0.2, aggregation="token-mean")
    expect = (-2.0 * 1.2 + 1.0 * 0.8 - 3.0) / 3
    assert abs(loss.item() - expect) < 1e-12
    assert abs(m["clip_fraction"].item() - 2 / 3) < 1e-12
    loss.backward()
    # clipped tokens carry no gradient; the unclipped one: d(-A r)/dlp = -A r / 3
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 3
    assert abs(m["approx_kl"].item() - k3) < 1e-12
    assert abs(m["ratio_mean"].item() - (math.exp(0.5) + math.exp(-0.5) + 1) / 3) < 1e-12


def test_ppo_dual_clip_and_asymmetric_range_against_plain():
    torch.manual_seed(0)
    lp = torch.randn(200, dtype=torch.float64)
    old = torch.randn(200, dtype=torch.float64)
    adv = torch.randn(200, dtype=torch.float64) * 2
    loss, m = obj.ppo_loss(lp, old, adv, clip=(0.2, 0.28), dual_clip=3.0)
    ref = _ppo_plain(lp, old, adv, 0.2, 0.28, dual=3.0).mean()
    assert abs(loss.item() - ref.item()) < 1e-12
    r = (lp - old).exp()
    dual_active = ((adv < 0) & (-adv * r > -adv * 3.0)).double().mean()
    assert dual_active > 0 and abs(m["dual_clip_fraction"].item() - dual_active.item()) < 1e-12


def test_masked_tokens_and_sequence_of_length_one():
    lp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]], dtype=torch.float64)
    old = torch.zeros_like(lp)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_tok = _ppo_plain(lp.flatten(), old.flatten(), adv.flatten(), 0.2, 0.2).view(2, 3)
    mk = mask.double()
    cases = {
        "token-mean": (per_tok * mk).sum() / 4,
        "seq-mean-token-sum": (per_tok * mk).sum() / 2,
        "seq-mean-token-mean": ((per_tok[0] * mk[0]).sum() / 3 + per_tok[1, 0]) / 2,
        "seq-mean-token-sum-norm": (per_tok * mk).sum() / (2 * 3),
    }
    for mode, expect in cases.items():
        loss, _ = obj.ppo_loss(lp, old, adv, mask=mask, aggregation=mode)
        assert abs(loss.item() - expect.item()) < 1e-12, mode
    # an explicit global normaliser (data-parallel token count)
    loss, _ = obj.ppo_loss(lp, old, adv, mask=mask, aggregation="token-mean", normalizer=10)
    assert abs(loss.item() - (per_tok * mk).sum().item() / 10) < 1e-12
    # (rows,) input: every row a sequence of one token
    loss, _ = obj.ppo_loss(lp[:, 0], old[:, 0], adv[:, 0], aggregation="seq-mean-token-mean")
    assert abs(loss.item() - per_tok[:, 0].mean().item()) < 1e-12


def test_kl_estimators():
    lp = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -0.5, -1.0], dtype=torch.float64)
    d = ref - lp.detach()
    torch.testing.assert_close(obj.kl_penalty(lp, ref, "k1"), -d)
    torch.testing.assert_close(obj.kl_penalty(lp, ref, "k2"), d * d / 2)
    k3 = obj.kl_penalty(lp, ref, "k3")
    torch.testing.assert_close(k3.detach(), torch.exp(d) - d - 1)
    assert (k3 >= 0).all()
    k3.sum().backward()
    torch.testing.assert_close(lp.grad, 1 - torch.exp(d))  # d/dlp [e^(ref-lp) - (ref-lp) - 1]


def test_k3_is_unbiased_for_kl():
    torch.manual_seed(1)
    p = torch.distributions.Categorical(logits=torch.randn(10, dtype=torch.float64))
    q = torch.distributions.Categorical(logits=torch.randn(10, dtype=torch.float64))
    a = p.sample((200000,))
    est = obj.kl_penalty(p.log_prob(a), q.log_prob(a), "k3")
    exact = torch.distributions.kl_divergence(p, q)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 5 * se


def test_importance_weights():
    lp = torch.tensor([[0.0, 1.0], [0.5, -0.5]], dtype=torch.float64)
    b = torch.zeros_like(lp)
    w = obj.importance_weights(lp, b, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0], [math.exp(0.5), math.exp(-0.5)]], dtype=torch.float64))
    w = obj.importance_weights(lp, b, cap=2.0, mode="mask")
    assert w[0, 1] == 0
    mask = torch.tensor([[1, 1], [1, 0]])
    w = obj.importance_weights(lp, b, level="sequence", cap=10.0, mask=mask)
    torch.testing.assert_close(w, torch.tensor([[math.e, math.e], [math.exp(0.5)] * 2], dtype=torch.float64))
    assert not w.requires_grad


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: obj.aggregate(torch.ones(3), mode="seq-sum"), ValueError, "aggregation"),
        (lambda: obj.aggregate(torch.ones(3), normalizer=0), ValueError, "normalizer"),
        (lambda: obj.ppo_loss(torch.ones(3), torch.ones(2), torch.ones(3)), ValueError, "old_log_prob"),
        (lambda: obj.ppo_loss(torch.ones(3), torch.ones(3), torch.ones(3), clip=1.5), ValueError, "clip low"),
        (lambda: obj.ppo_loss(torch.ones(3), torch.ones(3), torch.ones(3), dual_clip=0.5), ValueError, "dual_clip"),
        (lambda: obj.ppo_loss(torch.ones(3), torch.ones(3), torch.ones(3), mask=torch.ones(2)), ValueError, "mask"),
        (lambda: obj.kl_penalty(torch.ones(3), torch.ones(3), "k4"), ValueError, "estimator"),
        (lambda: obj.aggregate(torch.ones(2, 2, 2)), ValueError, "rows"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@devices()
def test_composes_with_log_prob_through_one_backward(device):
    import pgest
    torch.manual_seed(2)
    x = torch.randn(4, 3, 20, dtype=torch.float64, requires_grad=True)  # 4 sequences of 3 tokens
    a = torch.randint(0, 20, (4, 3))
    old = torch.log_softmax(x.detach(), -1).gather(-1, a[..., None]).squeeze(-1) + 0.1
    adv = torch.randn(4, 1, dtype=torch.float64).expand(4, 3)
    lp, ent = pgest.log_prob(x.to(device), a.to(device))
    lp, ent = lp.cpu(), ent.cpu()  # the objectives on the CPU; log_prob's backward on the device
    loss, _ = obj.ppo_loss(lp, old, adv, aggregation="seq-mean-token-mean")
    loss = loss + obj.entropy_bonus(ent, 0.01) + 0.1 * obj.aggregate(obj.kl_penalty(lp, old))
    (g,) = torch.autograd.grad(loss, x)
    xr = x.detach().clone().requires_grad_()
    ls = torch.log_softmax(xr, -1)
    lpr = ls.gather(-1, a[..., None]).squeeze(-1)
    entr = -(ls.exp() * ls).sum(-1)
    r = (lpr - old).exp()
    per = torch.max(-adv * r, -adv * r.clamp(0.8, 1.2))
    ref = per.mean(-1).mean() - 0.01 * entr.mean() + 0.1 * (torch.exp(old - lpr) - (old - lpr) - 1).mean()
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-13)


# ---- edges: every token masked, masked NaN and overflow, 16-bit counts -------

@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_every_token_masked_gives_zero_loss_and_zero_gradients(mode):
    lp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for loss in (obj.aggregate(lp, mask, mode), obj.ppo_loss(lp, lp.detach() - 0.3, torch.ones(3, 4,
                 dtype=torch.float64), mask=mask, aggregation=mode)[0],
                 obj.policy_gradient_loss(lp, torch.ones(3, 4, dtype=torch.float64), mask=mask, aggregation=mode),
                 obj.entropy_bonus(lp, 0.1, mask=mask, aggregation=mode)):
        (g,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0.0
        assert torch.equal(g, torch.zeros_like(g))
    # the empty batch too
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    assert obj.aggregate(empty, None, mode).item() == 0.0


def test_masked_nan_and_overflow_never_reach_the_loss_or_gradient():
    # verl's masked_mean: the unmasked entries' mean, whatever the masked one holds
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    m = torch.tensor([1, 1, 1, 1, 0])
    assert obj.aggregate(v, m).item() == 2.5
    # an old log-prob of -100 on a masked token: its ratio e^99 overflows float32
    lp = torch.tensor([[-1.0, -2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -100.0]])
    adv = torch.tensor([[1.0, -1.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = obj.ppo_loss(lp, old, adv, mask=mask)
    loss.backward()
    ref_lp = lp.detach()[:, :2].clone().requires_grad_()
    ref, _ = obj.ppo_loss(ref_lp, old[:, :2], adv[:, :2])
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lp.grad[:, :2], ref_lp.grad)
    assert lp.grad[0, 2] == 0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # NaN sampler log-probs on padding (TRL's GRPO stays finite there)
    w = obj.importance_weights(lp.detach(), torch.tensor([[-1.0, -2.0, float("nan")]]), level="sequence", mask=mask)
    assert torch.isfinite(w).all() and w[0, 0].item() == 1.0
    pg = obj.policy_gradient_loss(torch.tensor([[-1.0, float("nan")]]), torch.tensor([[2.0, float("nan")]]),
                                  mask=torch.tensor([[1, 0]]))
    assert pg.item() == 2.0


def test_float16_counts_and_sums_do_not_overflow():
    # 70,000 tokens: a float16 count saturates at 65504 (inf / inf = NaN)
    torch.manual_seed(3)
    v = (torch.rand(70_000) * 2).half()
    mask = torch.ones(70_000, dtype=torch.bool)
    for mode in obj.AGGREGATIONS:
        got = obj.aggregate(v.view(7, 10_000), mask.view(7, 10_000), mode)
        assert got.dtype == torch.float16 and torch.isfinite(got), mode
    got = obj.aggregate(v, mask)
    torch.testing.assert_close(got.double(), v.double().mean(), rtol=1e-3, atol=0)


def test_kl_clamp_as_verl_low_var_kl():
    lp = torch.tensor([-1.0, -20.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -1.0, -0.5], dtype=torch.float64)
    k = obj.kl_penalty(lp, ref, "k3", clamp=10.0)
    d = ref - lp.detach()
    want = (torch.exp(d) - d - 1).clamp(-10, 10)  # e^19 - 20: clipped to 10
    torch.testing.assert_close(k.detach(), want)
    k.sum().backward()
    assert lp.grad[1] == 0 and lp.grad[0] != 0
    with pytest.raises(ValueError, match="clamp"):
        obj.kl_penalty(lp, ref, clamp=0)


# ---- the sampler/trainer mismatch figures ------------------------------------

def test_mismatch_figures_against_a_plain_computation():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64) - 2
    t = s + torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.1
    t[0, :3] = s[0, :3]  # three tokens agree exactly
    mask = torch.rand(6, 9, generator=g) < 0.8
    mask[0, :3] = True
    s[~mask] = float("nan")  # padding never reaches a figure
    got = obj.mismatch(s.float(), t.float(), mask)
    sk, tk = s.float()[mask].double(), t.float()[mask].double()
    d = tk - sk
    r = d.exp()
    want = {"identical": (s.float()[mask] == t.float()[mask]).double().mean(), "max_abs_diff": d.abs().max(),
            "mean_abs_diff": d.abs().mean(), "kl_k1": (-d).mean(), "kl_k3": (r - d - 1).mean(),
            "ratio_mean": r.mean(), "ratio_std": r.std(unbiased=False), "ratio_min": r.min(), "ratio_max": r.max(),
            "outside_band": ((r < 0.9) | (r > 1.1)).double().mean(), "tokens": torch.tensor(float(mask.sum()))}
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k].double(), rtol=1e-12, atol=1e-12, msg=k)
    assert got["identical"] * mask.sum() >= 3 - 1e-9


def test_mismatch_of_known_ratios_and_of_nothing():
    s = torch.zeros(4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.0, math.log(1.2), math.log(1.2)], dtype=torch.float64)
    got = obj.mismatch(s, t, band=(0.95, 1.15))
    assert got["outside_band"] == 0.5 and got["identical"] == 0.5
    torch.testing.assert_close(got["ratio_mean"], torch.tensor(1.1, dtype=torch.float64))
    torch.testing.assert_close(got["kl_k1"], torch.tensor(-math.log(1.2) / 2, dtype=torch.float64))
    none = obj.mismatch(s, t, torch.zeros(4, dtype=torch.bool))
    assert all(v == 0 for v in none.values())
    with pytest.raises(ValueError, match="band must be a pair"):
        obj.mismatch(s, t, band=(1.1, 0.9))
    with pytest.raises(TypeError, match="sampler_log_prob must be a float tensor"):
        obj.mismatch(torch.zeros(4, dtype=torch.int64), t)


def test_mismatch_is_zero_between_pgest_sampler_and_trainer():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(64, 16, generator=g), torch.randn(500, 16, generator=g)
    s = pgest.linear_sample(h, w, temperature=0.8, top_p=0.9, generator=g)
    lp, _ = pgest.linear_log_prob(h, w, s.actions, temperature=0.8, top_p=0.9)
    m = obj.mismatch(s.log_prob, lp)
    assert m["identical"] == 1 and m["max_abs_diff"] == 0 and m["kl_k3"] == 0


# ---- the GRPO family against TRL's own loss ---------------------------------------------------


def _trl_loss(loss_type, level, eps, eps_high, delta, beta, lp, old, ref, adv, mask, sapo=(1.0, 1.05)):
    """TRL 1.16's GRPOTrainer._compute_loss, called on a stand-in trainer
    whose model returns the given per-token log-probs (one process, no
    accumulation): the loss and the metrics it logs."""
    import collections
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    class Accelerator:
        num_processes = 1

        def reduce(self, t, reduction="sum"):
            return t

        def gather(self, t):
            return t

        gather_for_metrics = gather

    B, T = lp.shape
    metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=False, sapo_temperature_pos=sapo[0],
                             sapo_temperature_neg=sapo[1], steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps if eps_high is None else eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=Accelerator(), max_completion_length=T,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, use_adaptive_entropy=False, _metrics=metrics)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().double()}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("loss_type", obj.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_is_trls_loss_and_metrics(loss_type, level):
    # every combination of beta, delta and clip-higher: the loss, its gradient
    # and the logged metrics of TRL's trainer, to float64 rounding
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(len(loss_type) + len(level))
    B, T = 6, 7
    lp0 = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.0
    old = lp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios well outside [0.8, 1.2]
    ref = lp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # a completion with no tokens
    mask[0] = True
    for beta in (0.0, 0.04):
        for delta in (None, 1.4):
            for eps_high in (None, 0.28):
                kw = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=eps_high,
                          delta=delta, beta=beta)
                if loss_type == "cispo":
                    kw["epsilon_high"] = 5.0 if eps_high is None else 1.3  # cispo's bound is on the ratio itself
                a = lp0.clone().requires_grad_()
                theirs, their_metrics = _trl_loss(loss_type, level, 0.2, kw["epsilon_high"], delta, beta, a, old,
                                                  ref, adv, mask)
                theirs.backward()
                b = lp0.clone().requires_grad_()
                ours, our_metrics = obj.grpo_loss(b, old, adv, mask, ref_log_prob=ref, max_completion_length=T,
                                                         **kw)
                ours.backward()
                where = f"{kw}"
                torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14, msg=where)
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14, msg=where)
                for k, v in their_metrics.items():
                    if k in ("entropy",):
                        continue
                    assert k in our_metrics, (k, where)
                    # TRL takes the clip shares of float32 flags: float32 rounding
                    assert abs(float(our_metrics[k]) - v) <= 1e-6 * max(1e-3, abs(v)), (k, where)


def test_grpo_loss_arguments_are_checked():
    lp = torch.zeros(2, 3)
    adv = torch.zeros(2)
    for kw, exc, match in [(dict(loss_type="ppo"), ValueError, "loss_type"),
                           (dict(loss_type="vespo"), NotImplementedError, "vespo"),
                           (dict(importance_sampling_level="token-mean"), ValueError, "importance_sampling_level"),
                           (dict(epsilon=1.5), ValueError, "epsilon"),
                           (dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
                           (dict(delta=0), ValueError, "delta"),
                           (dict(beta=0.1), ValueError, "ref_log_prob"),
                           (dict(loss_type="dr_grpo"), ValueError, "max_completion_length")]:
        with pytest.raises(exc, match=match):
            obj.grpo_loss(lp, lp, adv, **kw)
    with pytest.raises(ValueError, match="advantages"):
        obj.grpo_loss(lp, lp, torch.zeros(3))
    # NaN in masked positions reaches neither the loss nor the gradient
    x = torch.tensor([[0.1, float("nan")], [0.2, 0.3]], requires_grad=True)
    loss, _ = obj.grpo_loss(x, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 0], [1, 1]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
