"""Truncated sampling and scoring (temperature, top-k, top-p, min-p, greedy):
kept sets against a float64 definition written here and against
transformers' warpers, the draws' frequencies, the sampler's and the trainer's
log-probabilities bit for bit, replay by threshold and by token lists,
gradients, edge values and errors."""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES, devices, gen, on_cpu
from scipy import stats

import pgest
from pgest.ops.truncation import (
    check_filters_op,
    check_kept_op,
    check_kept_tokens_op,
    truncation_in_torch_ops,
    truncation_op,
)

MINUS_INF = float("-inf")


def mass_above(z, q):
    """Per entry, the mass q of the entries with a strictly larger z (ties grouped)."""
    zs, order = z.sort(-1)
    csum = q.gather(-1, order).cumsum(-1)
    at_or_below = torch.searchsorted(zs.contiguous(), z.contiguous(), right=True)
    below = torch.where(at_or_below > 0, csum.gather(-1, (at_or_below - 1).clamp_min(0)), 0.0)
    return csum[..., -1:] - below


def reference_keep(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(R, K) bool: the definitions, one row at a time, in float64 masses over
    the tempered values the kernels form (x / T in float32)."""
    z = (x.float() / torch.tensor(temperature, dtype=torch.float32)).double()
    keep = z > MINUS_INF
    zmax = z.max(-1, keepdim=True).values
    if 0 < top_k < x.shape[-1]:
        kth = z.topk(top_k, -1).values[:, -1:]
        keep &= z >= kth
    if top_p < 1.0:
        q = torch.where(keep, torch.exp(z - zmax), 0.0)
        q = q / q.sum(-1, keepdim=True)
        keep &= (mass_above(z, q) < top_p) | (z == zmax)
    if min_p > 0.0:
        keep &= z >= zmax + math.log(min_p)
    return keep


def kept_of(x, **kw):
    """The set pgest.sample/log_prob use: where the truncated logits are finite."""
    from pgest.truncation import filters, kept_logits

    z, _ = kept_logits(x, filters(x.shape[:-1], **kw))
    return z > MINUS_INF


def near_top_p_boundary(x, temperature, top_k, top_p, tol=1e-5):
    """Rows where some cumulative mass is within float rounding of top_p."""
    z = (x.float() / temperature).double()
    keep = reference_keep(x, temperature, top_k)
    q = torch.where(keep, torch.exp(z - z.max(-1, keepdim=True).values), 0.0)
    q = q / q.sum(-1, keepdim=True)
    return ((mass_above(z, q) - top_p).abs() < tol).any(-1)


CASES = [dict(top_k=5), dict(top_k=1), dict(top_p=0.9), dict(top_p=0.3), dict(min_p=0.1),
         dict(temperature=0.7, top_k=50, top_p=0.95), dict(temperature=1.5, top_p=0.8, min_p=0.05),
         dict(temperature=0.5, top_k=20, min_p=0.2), dict(top_k=10**6), dict(top_p=1.0), dict(min_p=0.0)]


@devices()
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("K", [7, 300, 5000])
def test_kept_set_matches_the_definition(kw, K, device):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(40, K, generator=g) * 2
    x[3, : K // 2] = x[3, 0]  # a tie across half the row
    x[4, 1:] = -30.0  # one token holds nearly all the mass
    x[5, K // 3:] = MINUS_INF
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    expected = reference_keep(x, **full)
    got = kept_of(x.to(device), **kw).cpu()
    rows = ~near_top_p_boundary(x, full["temperature"], full["top_k"], full["top_p"]) \
        if full["top_p"] < 1 else torch.ones(40, dtype=torch.bool)
    assert rows.sum() >= 36
    assert torch.equal(got[rows], expected[rows])
    rec = on_cpu(pgest.truncation(x.to(device), **kw))
    assert torch.equal(rec.kept[rows], expected.sum(-1)[rows])
    z = x.float() / full["temperature"]
    smallest = torch.where(expected, z, float("inf")).min(-1).values
    assert torch.equal(rec.threshold[rows], smallest[rows])
    zd = z.double()
    full_p = torch.softmax(zd, -1)
    torch.testing.assert_close(rec.kept_mass[rows], torch.where(expected, full_p, 0.0).sum(-1)[rows],
                               rtol=1e-6, atol=1e-9)


def long_rows(K, seed=0):
    """Rows that the selections' shortcuts meet badly: ascending and
    descending order (a running bound raised by every entry, or by none), a
    constant row, ties at the k-th value, signed zeros, and peaked rows
    (the mass in a few entries that a strided sample misses)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, K, generator=g) * 3
    x[0] = x[0].sort().values
    x[1] = x[1].sort(descending=True).values
    x[2] = 1.25
    x[3] = torch.randint(-3, 4, (K,), generator=g).float()  # seven values, thousands of ties each
    x[4] = torch.where(torch.rand(K, generator=g) < 0.5, 0.0, -0.0)
    x[4, :40] = torch.arange(40.0) / 10
    for r in (5, 6, 7):
        x[r] *= 2 / 3
        idx = torch.randperm(K, generator=g)[:64]
        x[r, idx] += torch.rand(64, generator=g) * 10 + 4
    x[8, K // 2:] = MINUS_INF
    return x


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=50), dict(top_k=1000), dict(top_k=9999),
                                dict(top_p=0.5), dict(top_p=0.95), dict(top_p=0.99995),
                                dict(top_k=3000, top_p=0.9), dict(top_p=0.9, min_p=0.01)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@devices()
def test_long_rows_in_adversarial_orders_and_ties(kw, dtype, device):
    x = long_rows(40000).to(dtype)
    xd = x.to(device)
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    expected = reference_keep(x, **full)
    rows = ~near_top_p_boundary(x, 1.0, full["top_k"], full["top_p"], tol=2e-6) if full["top_p"] < 1 \
        else torch.ones(10, dtype=torch.bool)
    assert rows.sum() >= 3
    got = kept_of(xd, **kw).cpu()
    assert torch.equal(got[rows], expected[rows])
    rec = on_cpu(pgest.truncation(xd, **kw))
    if full["top_p"] < 1 and full["top_k"] == 0 and full["min_p"] == 0:
        # rows within rounding of p: still a set of the largest entries that
        # holds p of the mass to float rounding, and no more than it needs
        q = torch.softmax(x.double(), -1)
        t = rec.threshold.double()[:, None]
        assert torch.equal(got, x.double() >= t)
        assert bool(((q * got).sum(-1) >= full["top_p"] - 1e-5).all())
        assert bool(((q * (x.double() > t)).sum(-1) < full["top_p"] + 1e-5).all())
    z = x.float()
    smallest = torch.where(expected, z, float("inf")).min(-1).values
    largest_dropped = torch.where(expected, float("-inf"), z).max(-1).values
    assert torch.equal(rec.kept[rows], expected.sum(-1)[rows])
    assert torch.equal(rec.threshold[rows], smallest[rows])
    # the cut lies strictly between the largest dropped and the smallest kept value (or is the latter)
    dropped = rows & (largest_dropped > MINUS_INF)
    assert bool((rec.cut[dropped] > largest_dropped[dropped]).all())
    assert bool((rec.cut[dropped] <= smallest[dropped]).all())
    assert bool((rec.cut[rows & ~dropped] == MINUS_INF).all())
    torch.testing.assert_close(rec.kept_mass[rows], torch.where(expected, torch.softmax(z.double(), -1), 0.0)
                               .sum(-1)[rows], rtol=1e-6, atol=1e-9)
    # the draws stay in the kept set, and the sampler's log-probs are the trainer's
    s = pgest.sample(xd, generator=gen(3, device), num_samples=8, **kw)
    assert bool(expected.gather(1, s.actions.cpu()).all())
    lp, _ = pgest.log_prob(xd, s.actions, **kw)
    assert torch.equal(lp, s.log_prob)


def shortcut_rows(K, g):
    """Rows for the sampler's two ways to the kept set's statistics without
    a pass of exponentials over the masked row (a list of the kept entries;
    the whole row's stored exponentials): the row's max early, late and in
    the middle; a first chunk that is all left out, so the whole row's
    running max is one the kept set never has; steps of 70 between chunks
    (past the chunk pass's 64, so sums are taken at each chunk's own max);
    a gentle ramp raising the max in every chunk; signed zeros and ties;
    the largest values exactly where a strided sample of the row looks (so a
    bound from the sample keeps too few for top-k)."""
    x = torch.randn(9, K, generator=g) * 3
    x[1] = x[1].sort().values
    x[2] = x[2].sort(descending=True).values
    x[3, :256] = -30 + torch.randn(min(256, K), generator=g)
    x[4] = torch.randn(K, generator=g) * 0.1 + 70 * (torch.arange(K) // 256).clamp_max(2)
    x[5] = torch.arange(K) * (4.0 / K) + torch.randn(K, generator=g) * 0.05
    x[6] = torch.where(torch.rand(K, generator=g) < 0.5, 0.0, -0.0)
    x[6, : min(40, K)] = torch.arange(min(40, K)) / 10
    x[7] = torch.randint(-3, 4, (K,), generator=g).float()
    x[8] = torch.randn(K, generator=g) * 0.1 - 10
    x[8, :: max(1, K // 512)] = torch.rand(len(range(0, K, max(1, K // 512))), generator=g) * 10
    return x


@pytest.mark.parametrize("kw", [dict(top_p=0.95), dict(top_p=0.5, temperature=0.7), dict(top_p=0.9999),
                                dict(top_k=5), dict(top_k=300, top_p=0.9), dict(min_p=1e-40), dict(min_p=0.05)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("K", [17, 300, 4099, 40000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sampler_statistics_without_the_masked_pass_are_the_trainers(kw, K, dtype):
    x = shortcut_rows(K, torch.Generator().manual_seed(K)).to(dtype)
    if dtype != torch.float64:  # the set itself, against the definition (float32 division, as the kernels)
        full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
        rows = ~near_top_p_boundary(x, full["temperature"], full["top_k"], full["top_p"], tol=2e-6) \
            if full["top_p"] < 1 else torch.ones(len(x), dtype=torch.bool)
        assert rows.sum() >= 3
        assert torch.equal(kept_of(x, **kw)[rows], reference_keep(x, **full)[rows])
    s = pgest.sample(x, generator=torch.Generator().manual_seed(1), num_samples=4, **kw)
    # the trainer's: the chunk pass over the kept logits, bit for bit
    lp, ent = pgest.log_prob(x, s.actions, **kw)
    assert torch.equal(lp, s.log_prob) and torch.equal(ent, s.entropy)
    # and both the truncated distribution's, against float64
    z = x.double() / kw.get("temperature", 1.0)
    z = z.masked_fill(~kept_of(x, **kw), MINUS_INF)
    ref = torch.log_softmax(z, -1)
    q = ref.exp()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.log_prob.double(), ref.gather(1, s.actions), **tol)
    torch.testing.assert_close(s.entropy.double(), -(q * ref.nan_to_num(neginf=0.0)).sum(-1), **tol)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=50), dict(top_k=9999), dict(top_p=0.5), dict(top_p=0.95),
                                dict(top_p=0.99995), dict(top_k=3000, top_p=0.9), dict(top_p=0.9, min_p=0.01),
                                dict(temperature=0.6, top_k=40, top_p=0.8), dict(temperature=0.0)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_the_gpu_selection_keeps_the_cpu_set(kw, dtype):
    # The CUDA kernel's selection (radix descent over order keys, exact
    # fixed-point masses; truncation.h) run here by a team of one thread:
    # its record is the CPU kernel's (threshold, kept and cut bit for bit,
    # kept mass to rounding) on the adversarial rows, wherever no cumulative
    # mass is within rounding of top_p, and its set is the definition's.
    from pgest.ops.truncation import truncation_radix
    from pgest.truncation import filters

    x = long_rows(5000, seed=3).to(dtype)
    f = filters(x.shape[:-1], **kw)
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    rows = torch.ones(10, dtype=torch.bool)
    if full["top_p"] < 1:
        rows = ~near_top_p_boundary(x, full["temperature"], full["top_k"], full["top_p"], tol=2e-6)
    assert rows.sum() >= 3
    ours = truncation_radix(x, *f)
    cpu = truncation_op(x, *f)
    for j in (0, 1, 3):
        assert torch.equal(ours[j][rows], cpu[j][rows]), j
    torch.testing.assert_close(ours[2][rows], cpu[2][rows], rtol=1e-5, atol=1e-9)
    if full["temperature"] > 0 and dtype != torch.float64:  # the definition's z: x / T in float32
        z = x.float() / torch.tensor(full["temperature"], dtype=torch.float32)
        kept = (z >= ours[0][:, None]) & (z > MINUS_INF)
        assert torch.equal(kept[rows], reference_keep(x, **full)[rows])


def test_the_gpu_selection_on_signed_zeros_and_bad_rows():
    from pgest.ops.truncation import truncation_radix

    one = torch.ones(1, dtype=torch.float64)
    # +0 and -0 are one value: a tie, kept or left out together (their order
    # keys differ; 0.5 of the mass falls between them if they are told apart)
    x = torch.tensor([[2.0] + [0.0] * 3 + [-0.0] * 7])
    for f in (truncation_radix, truncation_op):
        assert int(f(x, one, torch.zeros(1, dtype=torch.int64), one * 0.5, one * 0)[1]) == 11
    x = torch.randn(3, 50)
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1, 7\]"):
        truncation_radix(x, one, torch.zeros(1, dtype=torch.int64), one * 0.9, one * 0)
    x[1, 7] = 1e30
    with pytest.raises(ValueError, match="overflows"):
        truncation_radix(x, one * 1e-10, torch.zeros(1, dtype=torch.int64), one * 0.9, one * 0)
    x[1] = MINUS_INF
    with pytest.raises(ValueError, match="-inf"):
        truncation_radix(x, one, torch.zeros(1, dtype=torch.int64), one * 0.9, one * 0)


def test_each_filter_keeps_what_transformers_warpers_keep():
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3000, generator=g) * 3
    warpers = {
        "top_k": (dict(top_k=40), [tf.TopKLogitsWarper(40)]),
        "top_p": (dict(top_p=0.9), [tf.TopPLogitsWarper(0.9)]),
        "min_p": (dict(min_p=0.05), [tf.MinPLogitsWarper(0.05)]),
        "all, transformers' order": (
            dict(temperature=0.8, top_k=100, top_p=0.7, min_p=0.02),
            [tf.TemperatureLogitsWarper(0.8), tf.TopKLogitsWarper(100), tf.TopPLogitsWarper(0.7),
             tf.MinPLogitsWarper(0.02)]),
    }
    for name, (kw, ws) in warpers.items():
        scores = x.clone()
        for w in ws:
            scores = w(None, scores)
        theirs = scores > MINUS_INF
        ours = kept_of(x, **kw)
        differ = (theirs != ours).any(-1)
        if "top_p" in kw:
            differ &= ~near_top_p_boundary(x, kw.get("temperature", 1.0), kw.get("top_k", 0), kw["top_p"])
        assert not differ.any(), (name, differ.nonzero().flatten().tolist())


def test_min_p_order_differs_from_vllm_where_min_p_removes_mass():
    # the docs' claim: vLLM's order (min-p before top-p) can keep another set
    x = torch.tensor([[0.30, 0.28, 0.26] + [0.01] * 16]).log()
    ours = kept_of(x, top_p=0.65, min_p=0.2)
    p = torch.softmax(x.double(), -1)
    vllm_first = p >= 0.2 * p.max()
    q = torch.where(vllm_first, p, 0.0) / torch.where(vllm_first, p, 0.0).sum()
    vllm = vllm_first & (mass_above(x.double(), q) < 0.65)
    assert ours.sum() == 3 and vllm.sum() == 2


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("S", [1, 4])
@devices()
def test_sampler_and_trainer_agree_bit_for_bit(dtype, S, device):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 700, generator=g) * 2).to(dtype).to(device)
    T = (torch.rand(3, 5, generator=g) + 0.3).to(device)  # per-token temperature
    top_p = torch.tensor([0.5, 0.9, 1.0, 0.95, 0.7]).repeat(3, 1).to(device)
    s = pgest.sample(x, num_samples=S, temperature=T, top_k=64, top_p=top_p, min_p=0.01,
                     generator=gen(2, device))
    assert isinstance(s, pgest.TruncatedSample) and s.truncation.kept.shape == (3, 5)
    lp, ent = pgest.log_prob(x, s.actions, temperature=T, top_k=64, top_p=top_p, min_p=0.01)
    assert torch.equal(lp, s.log_prob) and torch.equal(ent, s.entropy)
    lp2, ent2 = pgest.log_prob(x, s.actions, temperature=T, threshold=s.truncation.threshold)
    assert torch.equal(lp2, s.log_prob) and torch.equal(ent2, s.entropy)
    assert torch.equal(pgest.entropy(x, temperature=T, top_k=64, top_p=top_p, min_p=0.01), s.entropy)


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


SCORED = [dict(temperature=0.7, top_p=0.9), dict(top_k=5), dict(temperature=1.3, top_k=50, top_p=0.95, min_p=0.01),
          dict(min_p=0.1), dict(temperature=0.5), dict(temperature=0.0)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [17, 300, 4099, 40000])
@pytest.mark.parametrize("kw", SCORED, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_scoring_without_the_kept_logits_has_their_bits(kw, K, dtype):
    # The CPU kernels score the kept set through a view of the row; the kept
    # logits' route (kept_logits, then the log_prob kernels on them: what
    # torch.compile and CUDA run) is the reference, values and gradients,
    # signed zeros included. Rows: strided, one of padding (NaN, never read),
    # per-row temperatures, repeated actions, an action's gradient sharing
    # its entry with the entropy's.
    from pgest.ops.log_prob import rows_pair
    from pgest.truncation import filters, kept_logits

    g = torch.Generator().manual_seed(K)
    R = 7
    x = (torch.randn(K, R, generator=g) * 3).to(dtype).T  # column stride R
    if "temperature" in kw and kw["temperature"] == 0.5:
        kw = dict(kw, temperature=torch.rand(R, dtype=torch.float64, generator=g) + 0.3)
    s = pgest.sample(x, num_samples=3, generator=torch.Generator().manual_seed(1), **kw)
    a = s.actions.clone()
    a[:, 2] = a[:, 0]
    a[4] = -100
    x = x.clone().T.contiguous().T  # the same strides, NaN in the padding row
    x[4, 1] = float("nan")
    x.requires_grad_()
    lp, ent = pgest.log_prob(x, a, **kw)
    w = torch.randn(R, 3, generator=g)
    (gx,) = torch.autograd.grad((w * lp).sum() + 0.3 * ent.sum(), x)
    live = torch.arange(R) != 4
    xr = x.detach()[live].clone().requires_grad_()
    f = filters(xr.shape[:-1], **{k: (v[live] if torch.is_tensor(v) else v) for k, v in kw.items()})
    z, _ = kept_logits(xr, f, with_mass=False)
    lp2, ent2 = rows_pair(z, a[live].contiguous(), -100, (a[live].shape, (R - 1,)))
    (gr,) = torch.autograd.grad((w[live] * lp2).sum() + 0.3 * ent2.sum(), xr)
    assert torch.equal(_bits(lp[live]), _bits(lp2)) and torch.equal(_bits(ent[live]), _bits(ent2))
    assert torch.equal(_bits(gx[live]), _bits(gr))
    assert (lp[4] == 0).all() and ent[4] == 0 and (gx[4] == 0).all()
    assert torch.equal(lp[live, :2], s.log_prob[live, :2]) and torch.equal(ent[live], s.entropy[live])
    # entropy alone, and a replayed threshold
    e = pgest.entropy(x.detach()[live], **{k: (v[live] if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert torch.equal(_bits(e), _bits(ent2.detach()))
    lp3, _ = pgest.log_prob(x.detach(), a, temperature=kw.get("temperature"), threshold=s.truncation.threshold)
    assert torch.equal(lp3[live, :2], s.log_prob[live, :2])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [17, 300, 4099])
def test_outside_sampler_sets_scored_without_the_kept_logits(K, dtype, monkeypatch):
    # kept_tokens (vLLM's layout) on the CPU: each row's set formed in scratch
    # from its list, forward and backward; the formed route (the (R, K) kept
    # logits, what compile and CUDA run) is the reference, bit for bit
    import sys

    g = torch.Generator().manual_seed(K + 7)
    R = 6
    x = (torch.randn(R, K, generator=g) * 3).to(dtype)
    temps = torch.rand(R, dtype=torch.float64, generator=g) + 0.3
    temps[2] = 0.0  # greedy: the first maximum whatever the list
    keep = x.float() >= x.float().quantile(0.8, dim=-1, keepdim=True)
    keep[torch.arange(R), torch.randint(0, K, (R,), generator=g)] = True  # not a threshold's set
    ids = keep.nonzero()[:, 1]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(-1).cumsum(0)])
    z = torch.where(keep, x.float(), float("-inf"))
    a = torch.stack([z.argmax(-1), torch.multinomial(keep.float(), 1, generator=g).squeeze(1)], 1)
    a[2] = x[2].float().argmax()
    a[4, 1] = -100

    def run():
        xx = x.clone().requires_grad_()
        lp, ent = pgest.log_prob(xx, a, temperature=temps, kept_tokens=(ids, offsets))
        (lp.sum() * 0.7 + ent.sum()).backward()
        e = pgest.entropy(x, temperature=temps, kept_tokens=(ids, offsets))
        return lp.detach(), ent.detach(), xx.grad, e

    native = run()
    monkeypatch.setattr(sys.modules["pgest.log_prob"], "_native_kept", lambda x: False)
    formed = run()
    for u, v in zip(native, formed):
        assert torch.equal(_bits(u), _bits(v))
    outside = a.clone()
    outside[3, 0] = int((~keep[3]).float().argmax())
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"actions\[3, 0\] = \d+ is outside the kept set"):
        pgest.log_prob(x, outside, temperature=temps, kept_tokens=(ids, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncated_scoring_holds_no_more_memory_than_untruncated(dtype):
    # forward + backward of the trainer's truncated log_prob: its peak is the
    # gradient's, as without truncation; the kept logits (and their
    # gradient), R x K of float32 each, are never formed
    from pgest.examples.memory import peak_allocated_bytes

    g = torch.Generator().manual_seed(40)
    x = (torch.randn(64, 6000, generator=g) * 3).to(dtype).requires_grad_()
    a = pgest.sample(x.detach(), temperature=0.8, top_p=0.9, generator=g).actions

    def step(**kw):
        def run():
            lp, ent = pgest.log_prob(x, a, **kw)
            (lp.sum() + ent.sum()).backward()
            x.grad = None
        return run

    plain, truncated = peak_allocated_bytes(step()), peak_allocated_bytes(step(temperature=0.8, top_p=0.9))
    grad_bytes = x.numel() * x.element_size()
    assert grad_bytes <= plain <= grad_bytes * 1.05
    assert truncated <= plain * 1.05  # the formed route's peak: 2 float32 R x K tensors more


@devices()
def test_log_prob_is_the_renormalised_distribution_in_float64(device):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(30, 200, generator=g) * 2).double()
    kw = dict(temperature=0.6, top_k=30, top_p=0.85, min_p=0.02)
    keep = reference_keep(x, **kw)
    z = torch.where(keep, x / 0.6, MINUS_INF)
    s = on_cpu(pgest.sample(x.to(device), num_samples=3, generator=gen(4, device), **kw))
    ls = torch.log_softmax(z, -1)
    torch.testing.assert_close(s.log_prob, ls.gather(1, s.actions), rtol=1e-12, atol=1e-12)
    ent = -(torch.where(keep, ls.exp() * ls, 0.0)).sum(-1)
    torch.testing.assert_close(s.entropy, ent, rtol=1e-12, atol=1e-12)
    assert keep.gather(1, s.actions).all()


@devices()
def test_gradient_treats_the_kept_set_as_a_constant(device):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 40, generator=g) * 2).double().requires_grad_()
    a = torch.randint(0, 40, (6,), generator=g)
    kw = dict(temperature=0.8, top_k=25, min_p=0.01)
    keep = reference_keep(x.detach(), **kw)
    a = torch.where(keep.gather(1, a[:, None]).squeeze(1), a, keep.float().argmax(-1))
    xd, ad = x.detach().to(device).requires_grad_(), a.to(device)
    lp, ent = pgest.log_prob(xd, ad, **kw)
    w = torch.randn(6, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad((w.to(device) * lp).sum() + 0.3 * ent.sum(), xd)
    gx = gx.cpu()
    xr = x.detach().clone().requires_grad_()
    ls = torch.log_softmax(torch.where(keep, xr / 0.8, MINUS_INF), -1)
    ls_kept = torch.where(keep, ls, 0.0)  # no 0 * -inf, in value or in gradient
    ref = (w * ls.gather(1, a[:, None]).squeeze(1)).sum() - 0.3 * (ls_kept.exp() * ls_kept * keep).sum()
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)
    assert (gx[~keep] == 0).all()
    assert torch.autograd.gradcheck(lambda t: pgest.log_prob(t, ad, **kw), (xd,), eps=1e-7)


@devices()
def test_chi_square_on_adversarial_rows(device):
    # ties at the top-k boundary (all kept), a long tail under top-p at 128k entries
    K = 128_000
    g = torch.Generator().manual_seed(6)
    tail = torch.randn(K, generator=g) - 4
    tail[:5] = torch.tensor([6.0, 5.5, 5.0, 4.0, 4.0])
    ties = torch.full((K,), -5.0)
    ties[:6] = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    x = torch.stack([tail, ties])
    N = 40_000
    for row, kw in ((0, dict(top_p=0.95, temperature=1.3)), (1, dict(top_k=3))):
        s = on_cpu(pgest.sample(x[row:row + 1].to(device), num_samples=N, generator=gen(7, device), **kw))
        full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
        keep = reference_keep(x[row:row + 1], **full)[0]
        assert keep.gather(0, s.actions[0]).all()
        q = torch.softmax(torch.where(keep, x[row].double() / full["temperature"], MINUS_INF), -1)
        # the five most probable kept tokens one by one, the rest of the kept set lumped
        top = q.topk(5).indices
        counts = torch.stack([(s.actions[0] == t).sum() for t in top] + [torch.tensor(0)]).double()
        counts[-1] = N - counts[:-1].sum()
        expected = torch.cat([q[top], (1 - q[top].sum()).view(1)]) * N
        if expected[-1] < 5:
            counts, expected = counts[:-1], expected[:-1] * N / expected[:-1].sum()
        p = stats.chisquare(counts.numpy(), expected.numpy()).pvalue
        assert p > 1e-4, (row, p)  # fails by chance once in 10^4 runs


@devices()
def test_one_token_with_all_the_mass_and_greedy(device):
    x = torch.tensor([[0.0, 50.0, 0.0, 49.99], [1.0, 3.0, 3.0, 2.0], [5.0, -1.0, 5.0, 5.0]], device=device)
    s = on_cpu(pgest.sample(x, num_samples=8, top_p=0.5, generator=gen(0, device)))
    assert (s.actions[0] == 1).all() and (s.truncation.kept[0] == 1)
    g = on_cpu(pgest.sample(x, num_samples=3, temperature=0.0, generator=gen(0, device)))
    assert torch.equal(g.actions, torch.tensor([[1] * 3, [1] * 3, [0] * 3]))  # ties: the lowest index
    assert (g.log_prob == 0).all() and (g.entropy == 0).all()
    assert torch.equal(g.truncation.kept, torch.ones(3, dtype=torch.int64))
    assert torch.equal(g.truncation.threshold, torch.tensor([50.0, 3.0, 5.0]))
    xr = x.clone().requires_grad_()
    lp, ent = pgest.log_prob(xr, g.actions.to(device), temperature=0.0)
    assert (lp == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (xr.grad == 0).all()
    with pytest.raises(ValueError, match=r"actions\[2(, 0)?\] = 2 is outside the kept set"):
        pgest.log_prob(x, torch.tensor([[1], [1], [2]], device=device), temperature=0.0)
    # a batch that mixes greedy and sampled rows
    m = on_cpu(pgest.sample(x, temperature=torch.tensor([0.0, 1.0, 0.0], device=device), generator=gen(0, device)))
    assert m.actions[0] == 1 and m.actions[2] == 0 and m.log_prob[0] == 0 and m.log_prob[1] < 0


@devices()
def test_no_filter_draws_are_todays_bit_for_bit(device):
    g = torch.Generator().manual_seed(8)
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(50, 3001, generator=g) * 3).to(dtype).to(device)
        plain = on_cpu(pgest.sample(x, num_samples=3, generator=gen(9, device)))
        for kw in (dict(temperature=1.0), dict(top_k=0, top_p=1.0, min_p=0.0), dict(top_k=5000)):
            t = on_cpu(pgest.sample(x, num_samples=3, generator=gen(9, device), **kw))
            assert torch.equal(t.actions, plain.actions), (dtype, kw)
            assert torch.equal(t.log_prob, plain.log_prob) and torch.equal(t.entropy, plain.entropy)
            assert (t.truncation.kept == 3001).all() and torch.allclose(t.truncation.kept_mass,
                                                                        torch.ones(50, dtype=torch.float64))


@devices()
def test_replay_by_threshold_and_by_token_lists(device):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(9, 400, generator=g) * 2
    kw = dict(temperature=0.9, top_p=0.8)
    sd = pgest.sample(x.to(device), num_samples=2, generator=gen(11, device), **kw)
    keep = kept_of(x.to(device), **kw)
    ids = keep.nonzero()[:, 1]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), keep.sum(-1).cumsum(0)])
    lp, ent = pgest.log_prob(x.to(device), sd.actions, temperature=0.9, kept_tokens=(ids, offsets))
    assert torch.equal(lp, sd.log_prob) and torch.equal(ent, sd.entropy)
    s, keep = on_cpu(sd), keep.cpu()
    # the trainer's logits differ by rounding: replayed with the record's cut
    # (midway to the largest value left out) the set is the sampler's, while
    # the smallest kept value itself, at the boundary, may fall out
    y = x + torch.randn(x.shape, generator=g) * 1e-6
    lp_y, _ = on_cpu(pgest.log_prob(y.to(device), sd.actions, temperature=0.9, threshold=sd.truncation.cut))
    assert (s.truncation.cut < s.truncation.threshold).all()
    dropped = torch.where(keep, float("-inf"), x / 0.9).amax(-1)
    assert (s.truncation.cut > dropped).all()
    ref = torch.log_softmax(torch.where(keep, y / 0.9, MINUS_INF), -1).gather(1, s.actions)
    torch.testing.assert_close(lp_y, ref, rtol=1e-6, atol=1e-6)


def test_torch_route_matches_the_kernel():
    # the route of devices without a truncation kernel (CUDA), run here on the CPU
    g = torch.Generator().manual_seed(12)
    x = torch.randn(32, 1000, generator=g) * 2
    x[0, 500:] = MINUS_INF
    R = 32
    params = (torch.rand(R, dtype=torch.float64, generator=g) + 0.5, torch.randint(0, 300, (R,), generator=g),
              torch.rand(R, dtype=torch.float64, generator=g) * 0.5 + 0.5,
              torch.rand(R, dtype=torch.float64, generator=g) * 0.05)
    params[0][3] = 0.0  # greedy
    ours = truncation_op(x, *params)
    theirs = truncation_in_torch_ops(x, *params)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]) and torch.equal(ours[3], theirs[3])
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=1e-9)  # float32 exponentials


def test_registered_op_opcheck():
    x = torch.randn(5, 50)
    args = (torch.tensor([0.7], dtype=torch.float64), torch.tensor([10]), torch.full((5,), 0.9, dtype=torch.float64),
            torch.tensor([0.0], dtype=torch.float64))
    torch.library.opcheck(truncation_op, (x, *args))
    with pytest.raises(ValueError, match="top_k must be a"):
        truncation_op(x, args[0], torch.tensor([1.0]), args[2], args[3])
    with pytest.raises(ValueError, match="temperature must be finite and in"):
        truncation_op(x, torch.tensor([-0.5], dtype=torch.float64), *args[1:])
    with pytest.raises(ValueError, match="top_p must be finite and in"):
        truncation_op(x, args[0], args[1], torch.tensor([1.5], dtype=torch.float64), args[3])
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        truncation_op(x, args[0], torch.tensor([-1]), args[2], args[3])
    # the checks a traced call runs with its graph
    torch.library.opcheck(check_filters_op, args)
    with pytest.raises(ValueError, match="temperature must be finite and in"):
        check_filters_op(torch.tensor([-0.5], dtype=torch.float64), *args[1:])
    with pytest.raises(ValueError, match="top_p must be a"):
        check_filters_op(args[0], args[1], torch.full((5, 1), 0.9, dtype=torch.float64), args[3])
    z = torch.where(x > 0, x, float("-inf"))
    inside = (z > float("-inf")).int().argmax(-1, keepdim=True)
    torch.library.opcheck(check_kept_op, (z, inside, None))
    assert (check_kept_op(z, torch.full((5, 1), -100), -100) == 1).all()  # padding is not checked
    ids, offsets = torch.tensor([3, 1, 4]), torch.tensor([0, 2, 3])
    torch.library.opcheck(check_kept_tokens_op, (ids, offsets, 5))
    with pytest.raises(IndexError, match=r"ids must be in \[0, 4\), got 4"):
        check_kept_tokens_op(ids, offsets, 4)
    with pytest.raises(ValueError, match="must rise from 0"):
        check_kept_tokens_op(ids, torch.tensor([0, 3, 2]), 5)
    with pytest.raises(ValueError, match="ids must be a 1-D int64"):
        check_kept_tokens_op(ids.int(), offsets, 5)
    with pytest.raises(ValueError, match=r"actions\[\d, 1\] = \d+ is outside the kept set"):
        check_kept_op(z, torch.cat([inside, (z == float("-inf")).int().argmax(-1, keepdim=True)], 1), None)
    with pytest.raises(ValueError, match="actions must be 2-D"):
        check_kept_op(z, inside[:3], None)
    with pytest.raises(TypeError, match="logits must be float32"):
        check_kept_op(z.int(), inside, None)


def test_truncated_head_ops_opcheck():
    from pgest.linear.truncated import truncated_log_prob_backward_op, truncated_log_prob_op, truncated_sample_op

    g = torch.Generator().manual_seed(42)
    h, w, b = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    f = (torch.full((6,), 0.8, dtype=torch.float64), torch.tensor([10]), torch.tensor([0.9], dtype=torch.float64),
         torch.tensor([0.0], dtype=torch.float64))
    a = (h @ w.T + b).argmax(-1, keepdim=True)
    for args in ((h, w, b, a, None, *f, None, 4096, 0.0), (h, w, None, a, -100, *f, None, 64, 30.0)):
        torch.library.opcheck(truncated_log_prob_op, args)
    lp, ent, st, found = truncated_log_prob_op(h, w, b, a, None, *f, None, 4096, 0.0)
    torch.library.opcheck(truncated_log_prob_backward_op,
                          (torch.ones_like(lp), torch.ones_like(ent), h, w, b, a, st, ent, found, None, *f, 4096,
                           [True, True, True], 0.0))
    with pytest.raises(ValueError, match="temperature must be finite and in"):
        truncated_log_prob_op(h, w, b, a, None, -f[0], *f[1:], None, 4096, 0.0)
    with pytest.raises(ValueError, match="found must be"):
        truncated_log_prob_backward_op(None, torch.ones_like(ent), h, w, b, a, st, ent, found[:3], None, *f, 4096,
                                       [True, True, True], 0.0)
    with pytest.raises(ValueError, match="budget must be a positive"):
        truncated_log_prob_op(h, w, b, a, None, *f, None, 0, 0.0)
    seed = torch.tensor([7, 0])
    torch.library.opcheck(truncated_sample_op, (h, w, b, *f, 3, seed, 4096, 0.0))
    draws = truncated_sample_op(h, w, b, *f, 3, seed, 4096, 0.0)
    lp2, _, _, _ = truncated_log_prob_op(h, w, b, draws[0], None, *f, None, 4096, 0.0)
    assert torch.equal(lp2, draws[1])  # sampler and trainer, bit for bit
    with pytest.raises(ValueError, match="num_samples"):
        truncated_sample_op(h, w, b, *f, 0, seed, 4096, 0.0)
    with pytest.raises(NotImplementedError, match="does not run under torch.func.vmap"):
        torch.func.vmap(lambda hh: truncated_sample_op(hh, w, b, *f, 1, seed, 4096, 0.0)[0])(h[None])
    with pytest.raises(ValueError, match=r"actions\[\d\] = \d+ is outside the kept set"):
        truncated_log_prob_op(h, w, b, (h @ w.T + b).argmin(-1, keepdim=True), None, *f, None, 4096, 0.0)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=-1.0), ValueError, r"temperature must be in \[0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(top_k=-3), ValueError, r"top_k must be in \[0"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \[0.0, 1.0\]"),
    (dict(top_p=float("nan")), ValueError, "top_p must be finite"),
    (dict(min_p=-0.1), ValueError, r"min_p must be in"),
    (dict(top_p=torch.ones(3)), ValueError, "top_p must be a number or a tensor of the rows' shape"),
    (dict(temperature="hot"), TypeError, "temperature must be a number or a tensor"),
    (dict(temperature=1e-40), ValueError, "temperature overflows|too small"),
])
@devices()
def test_bad_parameters_name_the_argument(kw, exc, match, device):
    x = torch.randn(4, 10, device=device) * 10
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        pgest.sample(x, **kw)


@devices()
def test_bad_scoring_inputs(device):
    t = lambda v, **kw: torch.tensor(v, device=device, **kw)
    x = torch.randn(4, 10, device=device)
    a = torch.zeros(4, dtype=torch.int64, device=device)
    x[:, 0] = 10.0
    x[2, 0] = -5.0
    with pytest.raises(ValueError, match=r"actions\[2\] = 0 is outside the kept set"):
        pgest.log_prob(x, a, top_k=3)
    with pytest.raises(ValueError, match="rows \\+ 1 = 5"):
        pgest.log_prob(x, a, kept_tokens=(t([0]), t([0, 1])))
    with pytest.raises(IndexError, match=r"kept_tokens token ids must be in \[0, 10\)"):
        pgest.log_prob(x, a, kept_tokens=(t([0, 1, 2, 10]), t([0, 1, 2, 3, 4])))
    with pytest.raises(ValueError, match="threshold or kept_tokens, not both"):
        pgest.log_prob(x, a, threshold=torch.zeros(4, device=device), kept_tokens=(t([0] * 4), torch.arange(5, device=device)))
    with pytest.raises(ValueError, match="one value per row"):
        pgest.log_prob(x, a, threshold=torch.zeros(3, device=device))
    with pytest.raises(TypeError, match="threshold must be a real tensor"):
        pgest.log_prob(x, a, threshold=torch.zeros(4, dtype=torch.complex64, device=device))
    with pytest.raises(ValueError, match=r"threshold\[2\] is NaN"):
        pgest.log_prob(x, a, threshold=t([0.0, 1.0, float("nan"), 0.0]))
    nan = torch.randn(4, 10, device=device)
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1, 3\] is nan"):
        pgest.sample(nan, top_p=0.9)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        pgest.log_prob(x, a, kept_tokens=(torch.arange(4, device=device), torch.arange(5, device=device)),
                       process_group=object())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_traced_route_forms_the_same_kept_logits(dtype, monkeypatch):
    # under torch.compile (and on CUDA) the kept logits are formed by torch ops
    # from the registered op's threshold: the same values as the native pass
    import sys

    tr = sys.modules["pgest.truncation"]  # the module (pgest.truncation is the function)
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(12, 900, generator=g) * 3).to(dtype)
    f = tr.filters(x.shape[:-1], temperature=torch.rand(12, generator=g) + 0.2, top_k=100, top_p=0.9, min_p=0.01)
    native, rec = tr.kept_logits(x, f)
    monkeypatch.setattr(tr, "traced", lambda: True)
    traced, rec2 = tr.kept_logits(x, f)
    assert torch.equal(native, traced)
    for a, b in zip(rec, rec2):
        assert torch.equal(a, b)


# ---- the fused head ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_head_sampler_and_trainer_agree_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(20)
    N, H, V = 45, 16, 2000
    h = torch.randn(N, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    T = torch.rand(N, generator=g) + 0.5  # per-token temperature
    kw = dict(temperature=T, top_k=200, top_p=0.9, min_p=0.001)
    s = pgest.linear_sample(h, w, bias=b, num_samples=3, generator=torch.Generator().manual_seed(21), token_tile=7,
                            **kw)
    assert isinstance(s, pgest.TruncatedSample)
    lp, ent = pgest.linear_log_prob(h, w, s.actions, bias=b, token_tile=7, **kw)
    assert torch.equal(lp, s.log_prob) and torch.equal(ent, s.entropy)
    lp2, ent2 = pgest.linear_log_prob(h, w, s.actions, bias=b, temperature=T, threshold=s.truncation.threshold,
                                      token_tile=7)
    assert torch.equal(lp2, s.log_prob) and torch.equal(ent2, s.entropy)
    # other tiles: other matmul shapes, whose products may differ in the last bit; the cut replays the set
    lp3, _ = pgest.linear_log_prob(h, w, s.actions, bias=b, temperature=T, threshold=s.truncation.cut)
    torch.testing.assert_close(lp3, s.log_prob, rtol=1e-4 if dtype != torch.float64 else 1e-12, atol=1e-5)
    # the draws: pgest.sample's on the materialised logits (float32 products), for the same generator state
    x = (h.double() @ w.double().T + b.double()).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref = pgest.sample(x, num_samples=3, generator=torch.Generator().manual_seed(21), **kw)
    assert (ref.actions == s.actions).float().mean() > 0.97  # a uniform within rounding of a boundary may move
    assert torch.equal(ref.truncation.kept, s.truncation.kept) or dtype != torch.float64


def test_linear_head_gradients_in_float64():
    g = torch.Generator().manual_seed(22)
    N, H, V = 30, 8, 400
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(temperature=0.7, top_p=0.8, min_p=0.01)
    s = pgest.linear_sample(h, w, bias=b, num_samples=2, generator=torch.Generator().manual_seed(23), **kw)
    lp, ent = pgest.linear_log_prob(h, w, s.actions, bias=b, token_tile=4, **kw)
    c = torch.randn(N, 2, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((c * lp).sum() + 0.2 * ent.sum(), (h, w, b))
    keep = reference_keep((h @ w.T + b).detach(), **(dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw))
    z = torch.where(keep, (h @ w.T + b) / 0.7, MINUS_INF)
    ls = torch.log_softmax(z, -1)
    ls_kept = torch.where(keep, ls, 0.0)
    ref = (c * ls.gather(1, s.actions)).sum() - 0.2 * (ls_kept.exp() * ls_kept * keep).sum()
    want = torch.autograd.grad(ref, (h, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lp, ls.gather(1, s.actions).detach(), rtol=1e-12, atol=1e-12)


def test_linear_head_greedy_and_block_memory():
    from pgest.examples.memory import peak_allocated_bytes
    from pgest.linear.truncated import BLOCK_LOGITS, BLOCK_SHARE, block_tokens

    g = torch.Generator().manual_seed(24)
    N, H, V = 400, 32, 20000
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    greedy = pgest.linear_sample(h, w, temperature=0.0)
    assert torch.equal(greedy.actions, (h @ w.T).argmax(-1)) and (greedy.log_prob == 0).all()
    assert block_tokens(N, V, 8 * 256) * BLOCK_SHARE <= N + BLOCK_SHARE  # small tiles: 1/40 of the tokens
    assert block_tokens(64, 32000, BLOCK_LOGITS) == 64  # a decode batch: one block
    logits_bytes = N * V * 4
    # tiles whose workspace is small against the logits: the 1/40 rule holds the peak
    small = peak_allocated_bytes(lambda: pgest.linear_sample(h, w, top_p=0.9, token_tile=8, vocab_tile=256))
    assert small < logits_bytes / 20, (small, logits_bytes)
    # default tiles: one block of BLOCK_LOGITS logits (416 tokens) over the sampler's own workspace
    h3 = torch.randn(3 * N, H, generator=g)
    tb = block_tokens(3 * N, V, BLOCK_LOGITS)
    assert tb == 416
    plain = peak_allocated_bytes(lambda: pgest.linear_sample(h3, w))
    default = peak_allocated_bytes(lambda: pgest.linear_sample(h3, w, top_p=0.9))
    assert default < plain + 1.25 * tb * V * 4 and default < 0.4 * 3 * logits_bytes, (default, plain, logits_bytes)


def test_linear_head_truncation_errors():
    h, w = torch.randn(5, 4), torch.randn(30, 4)
    with pytest.raises(ValueError, match="top_p must be in"):
        pgest.linear_sample(h, w, top_p=2.0)
    with pytest.raises(ValueError, match="temperature must be in"):
        pgest.linear_log_prob(h, w, torch.zeros(5, dtype=torch.int64), temperature=torch.full((5,), -1.0))
    a = (h @ w.T).argmin(-1)
    with pytest.raises(ValueError, match="outside the kept set"):
        pgest.linear_log_prob(h, w, a, top_k=2)
    for call in (lambda: pgest.linear_sample(h, w, top_k=3, process_group=object()),
                 lambda: pgest.linear_log_prob(h, w, a, top_p=0.5, process_group=object())):
        with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
            call()


def test_a_replayed_threshold_above_the_maximum_keeps_the_maximum():
    # logits that moved by rounding can put the row's maximum under the replayed
    # value: the maximum is always kept, never an empty set
    x = torch.tensor([[1.0, 0.5, -2.0], [3.0, 2.9, 0.0]])
    a = torch.tensor([0, 0])
    for f in (lambda: pgest.log_prob(x, a, threshold=torch.tensor([1.5, 2.95])),
              lambda: pgest.log_prob(x.double(), a, threshold=torch.tensor([1.5, 2.95]))):
        lp, ent = f()
        assert (lp == 0).all() and (ent == 0).all()


def test_second_derivatives_on_logits_and_their_refusal_in_the_head():
    g = torch.Generator().manual_seed(30)
    x = torch.randn(5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randint(0, 30, (5,), generator=g)
    kw = dict(temperature=0.9, top_k=12)
    keep = reference_keep(x.detach(), **(dict(top_p=1.0, min_p=0.0) | kw))
    a = torch.where(keep.gather(1, a[:, None]).squeeze(1), a, keep.float().argmax(-1))
    v = torch.randn(5, 30, generator=g, dtype=torch.float64)

    def hvp(f):
        (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
        return torch.autograd.grad((gx * v).sum(), x)[0]

    def ours(t):
        lp, ent = pgest.log_prob(t, a, **kw)
        return lp.sum() + 0.5 * ent.sum()

    def plain(t):
        ls = torch.log_softmax(torch.where(keep, t / 0.9, MINUS_INF), -1)
        lk = torch.where(keep, ls, 0.0)
        return ls.gather(1, a[:, None]).sum() - 0.5 * (lk.exp() * lk * keep).sum()

    torch.testing.assert_close(hvp(ours), hvp(plain), rtol=1e-9, atol=1e-11)
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8)
    lp, _ = pgest.linear_log_prob(h, w, (h @ w.T).argmax(-1).detach(), top_k=3)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


@devices()
def test_categorical_with_truncation_is_the_truncated_distribution(device):
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(3, 4, 60, generator=g) * 2).to(device).requires_grad_()
    kw = dict(temperature=0.7, top_k=30, top_p=0.9)
    d = pgest.Categorical(logits=x, **kw)
    s = pgest.sample(x.detach(), num_samples=1, generator=gen(5, device), **kw)
    a = d.sample(generator=gen(5, device))
    assert torch.equal(a, s.actions)  # the same draws as pgest.sample with the parameters
    assert torch.equal(d.log_prob(a), s.log_prob) and torch.equal(d.entropy(), s.entropy)
    assert torch.equal(d.truncation.kept, s.truncation.kept)
    keep = reference_keep(x.detach().reshape(12, 60).cpu(), **(dict(min_p=0.0) | kw)).view(3, 4, 60).to(device)
    torch.testing.assert_close(d.probs, torch.softmax(torch.where(keep, x.detach() / 0.7, MINUS_INF), -1))
    outside = torch.where(keep, 0, 1).argmax(-1)  # an action left out: probability 0
    assert (d.log_prob(outside) == MINUS_INF).all()
    # the gradient flows into the logits, the set a constant
    (d.log_prob(a).sum() + d.entropy().sum()).backward()
    assert (x.grad[~keep] == 0).all() and x.grad.abs().sum() > 0
    ref = torch.distributions.Categorical(logits=torch.where(keep, x.detach() / 0.7, MINUS_INF))
    torch.testing.assert_close(torch.distributions.kl_divergence(d, ref), torch.zeros(3, 4, device=device),
                               atol=1e-6, rtol=0)
    e = d.expand((2, 3, 4))
    assert e.truncation.kept.shape == (2, 3, 4)


def test_under_torch_compile_the_sampler_and_trainer_still_agree():
    # the traced route (registered pgest::truncation, kept logits by torch ops), one graph
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(40))

    def step(x):
        s = pgest.sample(x, top_p=0.9, temperature=0.7)
        lp, ent = pgest.log_prob(x, s.actions, top_p=0.9, temperature=0.7)
        return s, lp, ent

    torch.manual_seed(0)
    s, lp, ent = torch.compile(step, fullgraph=True)(x)
    assert torch.equal(lp, s.log_prob) and torch.equal(ent, s.entropy)
    keep = reference_keep(x, temperature=0.7, top_p=0.9)
    assert keep.gather(1, s.actions[:, None]).all()


def test_truncated_scoring_compiles_to_one_graph_with_eagers_bits():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(41)
    x0 = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    a = x0.argmax(-1)
    T = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.5], dtype=torch.float64)  # greedy rows among them
    top_p = torch.full((6,), 0.9)

    def loss(x):
        lp, ent = pgest.log_prob(x, a, temperature=T, top_k=40, top_p=top_p, min_p=0.01)
        ent2 = pgest.entropy(x, temperature=0.5, top_k=10)
        return lp, ent, ent2, (1.5 * lp).sum() + 0.1 * ent.sum() + ent2.sum()

    xe, xc = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    eager = loss(xe)
    eager[3].backward()
    compiled = torch.compile(loss, fullgraph=True)(xc)
    compiled[3].backward()
    for e, c in zip(eager[:3], compiled[:3]):  # (the loss's sums are inductor's to order)
        assert torch.equal(e, c)
    assert torch.equal(xe.grad, xc.grad)  # the eager route's gradient: grad * (1 / T)
    # bad data inside the graph: checked by registered ops where it runs, with eager's exceptions
    outside = x0.argmin(-1)
    with pytest.raises(ValueError, match=r"actions\[0\] = \d+ is outside the kept set"):
        torch.compile(lambda x: pgest.log_prob(x, outside, top_k=5), fullgraph=True)(x0)
    with pytest.raises(ValueError, match="top_p must be finite and in"):
        torch.compile(lambda x, p: pgest.entropy(x, top_p=p), fullgraph=True)(x0, torch.full((6,), 1.5))
    with pytest.raises(ValueError, match="temperature must be finite and in"):  # a replay: no selection op
        torch.compile(lambda x, t: pgest.log_prob(x, a, temperature=t, threshold=x.amax(-1)),
                      fullgraph=True)(x0, torch.full((6,), -0.5, dtype=torch.float64))
    # an outside sampler's kept token lists (vLLM's mask replay layout)
    keep = x0 > 0
    keep[torch.arange(6), a] = True
    ids = torch.cat([r.nonzero().flatten() for r in keep])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(-1).cumsum(0)])

    def replayed(x, ids, offsets):
        return pgest.log_prob(x, a, kept_tokens=(ids, offsets), temperature=0.8)

    for e, c in zip(replayed(x0, ids, offsets), torch.compile(replayed, fullgraph=True)(x0, ids, offsets)):
        assert torch.equal(e, c)
    with pytest.raises(IndexError, match=r"kept_tokens token ids must be in \[0, 50\), got 50"):
        torch.compile(replayed, fullgraph=True)(x0, torch.where(ids == ids.max(), 50, ids), offsets)
    with pytest.raises(ValueError, match="kept_tokens keeps no token of row 0"):
        torch.compile(replayed, fullgraph=True)(x0, ids[:0], torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be in"):  # a number: checked while tracing
        torch.compile(lambda x: pgest.entropy(x, temperature=-1.0))(x0)


def test_truncated_head_compiles_to_one_graph_with_eagers_bits():
    # the head's truncated scoring is a registered op: a compiled training
    # step with it is one graph (fullgraph), and gives the eager step's
    # log-probs, entropies and gradients bit for bit; the sampler (a
    # generator) runs eagerly and agrees with the trainer
    import warnings

    g = torch.Generator().manual_seed(41)
    h, w = torch.randn(12, 16, generator=g), torch.randn(300, 16, generator=g)
    temps = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    s = pgest.linear_sample(h, w, top_p=0.8, temperature=temps, generator=torch.Generator().manual_seed(3))

    def loss(h, w, a, temps):
        lp, ent = pgest.linear_log_prob(h, w, a, top_p=0.8, top_k=40, temperature=temps)
        return lp.sum() + 0.1 * ent.sum(), lp, ent

    def step(fn, h, w, a, temps):
        total, lp, ent = fn(h, w, a, temps)
        total.backward()
        return lp.detach(), ent.detach()

    s2 = pgest.linear_sample(h, w, top_p=0.8, top_k=40, temperature=temps, generator=torch.Generator().manual_seed(3))
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    eager = step(loss, he, we, s2.actions, temps)
    assert torch.equal(eager[0], s2.log_prob)  # sampler and trainer, bit for bit
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = step(torch.compile(loss, fullgraph=True), hc, wc, s2.actions, temps)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert torch.equal(he.grad, hc.grad) and torch.equal(we.grad, wc.grad)
    assert s.actions.shape == (12,)

    # the sampler too (no generator: the global one): the eager draws, bit for bit
    def draw(h, w, temps):
        t = pgest.linear_sample(h, w, top_p=0.8, top_k=40, temperature=temps, num_samples=2)
        return t.actions, t.log_prob, t.entropy, *t.truncation

    torch.manual_seed(5)
    eager = draw(h, w, temps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled_draw = torch.compile(draw, fullgraph=True)
        torch.manual_seed(5)
        compiled = compiled_draw(h, w, temps)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda h: pgest.linear_log_prob(h, w, s2.actions, top_p=0.8).log_prob.sum())(h)
