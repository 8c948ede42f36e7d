"""The fused linear head against the materialised formula: log_prob, entropy
and the three gradients in float64, cross entropy and linear_cross_entropy,
sampling against pgest.sample on the materialised logits, and a memory
test that fails if a (tokens, V) tensor is ever allocated."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import devices

import pgest


def materialised(hidden, weight, actions, bias=None, temperature=1.0, ignore_index=-100):
    logits = (hidden @ weight.T + (bias if bias is not None else 0)) / temperature
    ls = logits.log_softmax(-1)
    a = actions if actions.dim() == hidden.dim() else actions.unsqueeze(-1)
    keep = a != ignore_index
    lp = torch.where(keep, ls.gather(-1, torch.where(keep, a, torch.zeros_like(a))), torch.zeros((), dtype=ls.dtype))
    p = ls.exp()
    ent = -(p * torch.where(p > 0, ls, torch.zeros_like(ls))).sum(-1)
    live = keep.any(-1)
    ent = torch.where(live, ent, torch.zeros_like(ent))
    return (lp if actions.dim() == hidden.dim() else lp.squeeze(-1)), ent


def make(N, H, V, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    return hidden, weight, bias


@devices()
@pytest.mark.parametrize("V", [1, 7, 1000, 5001])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_materialised_float64(V, with_bias, temperature, device):
    N, H = 37, 16
    hidden, weight, bias = (t.to(device) for t in make(N, H, V, scale=3.0))
    bias = bias if with_bias else None
    g = torch.Generator().manual_seed(1)
    actions = torch.randint(0, V, (N, 3), generator=g).to(device)
    actions[5, 1] = -100
    actions[9, :] = -100  # a padding token: skipped, entropy 0, no gradient
    wlp = torch.randn(N, 3, dtype=torch.float64, generator=g).to(device)
    went = torch.randn(N, dtype=torch.float64, generator=g).to(device)
    ins = [t.clone().requires_grad_() for t in (hidden, weight)] + ([bias.clone().requires_grad_()] if with_bias else [])
    lp, ent = pgest.linear_log_prob(ins[0], ins[1], actions, bias=ins[2] if with_bias else None,
                                    temperature=temperature, token_tile=16, vocab_tile=300)
    ref_ins = [t.clone().requires_grad_() for t in (hidden, weight)] + ([bias.clone().requires_grad_()] if with_bias else [])
    rlp, rent = materialised(ref_ins[0], ref_ins[1], actions, ref_ins[2] if with_bias else None, temperature)
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, rent, rtol=1e-12, atol=1e-12)
    ((lp * wlp).sum() + (ent * went).sum()).backward()
    ((rlp * wlp).sum() + (rent * went).sum()).backward()
    for a, b in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert (ins[0].grad[9] == 0).all()


def test_gradcheck_small():
    hidden, weight, bias = make(5, 4, 11, seed=3)
    actions = torch.tensor([[0, 3], [10, 10], [2, -100], [7, 1], [5, 5]])
    f = lambda h, w, b: sum(t.sum() * (i + 1) for i, t in enumerate(
        pgest.linear_log_prob(h, w, actions, bias=b, temperature=1.3, token_tile=2, vocab_tile=4)))
    torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (hidden, weight, bias)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_against_float64(dtype, tol):
    N, H, V = 64, 32, 3001
    hidden, weight, bias = make(N, H, V, seed=4, scale=2.0)
    actions = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    lp, ent = pgest.linear_log_prob(hidden.to(dtype), weight.to(dtype), actions, bias=bias.to(dtype))
    # the reference on the same rounded inputs, in float64
    rlp, rent = materialised(hidden.to(dtype).double(), weight.to(dtype).double(), actions, bias.to(dtype).double())
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), rlp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(ent.double(), rent, rtol=tol, atol=tol * 10)


def test_reinforce_with_unit_advantages_is_cross_entropy():
    # -mean log p(target) is cross entropy; torch's own fused peer agrees too.
    N, H, V = 50, 24, 777
    hidden, weight, _ = make(N, H, V, dtype=torch.float32, seed=6)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = -pgest.linear_log_prob(h1, w1, targets).log_prob.mean()
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    if hasattr(F, "linear_cross_entropy"):
        h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lce = F.linear_cross_entropy(h3, w3, targets)
        torch.testing.assert_close(loss, lce, rtol=1e-5, atol=1e-6)


def test_shapes_tokens_zero_one_and_many():
    H, V = 8, 33
    _, weight, bias = make(1, H, V)
    for N in (0, 1, 4097):
        hidden = torch.randn(N, H, dtype=torch.float64)
        actions = torch.randint(0, V, (N,))
        lp, ent = pgest.linear_log_prob(hidden, weight, actions, bias=bias, token_tile=1000, vocab_tile=16)
        rlp, rent = materialised(hidden, weight, actions, bias)
        assert lp.shape == (N,) and ent.shape == (N,)
        torch.testing.assert_close(lp, rlp)
        torch.testing.assert_close(ent, rent)
    # (B, T, H) hidden, (B, T, S) actions, non-contiguous hidden
    hidden = torch.randn(3, 5, 2 * H, dtype=torch.float64)[..., ::2]
    actions = torch.randint(0, V, (3, 5, 2))
    lp, ent = pgest.linear_log_prob(hidden, weight, actions)
    rlp, rent = materialised(hidden, weight, actions)
    assert lp.shape == (3, 5, 2) and ent.shape == (3, 5)
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(ent, rent)


def test_tied_weights_accumulate():
    V, H = 40, 8
    emb = torch.nn.Embedding(V, H).double()
    tokens = torch.randint(0, V, (6, 4))
    targets = torch.randint(0, V, (6, 4))
    h = torch.tanh(emb(tokens))
    lp, _ = pgest.linear_log_prob(h, emb.weight, targets)
    (-lp.sum()).backward()
    g = emb.weight.grad.clone()
    emb.weight.grad = None
    h = torch.tanh(emb(tokens))
    rlp, _ = materialised(h, emb.weight, targets)
    (-rlp.sum()).backward()
    torch.testing.assert_close(g, emb.weight.grad)


def test_bad_input_messages():
    hidden, weight, bias = make(4, 6, 9, dtype=torch.float32)
    a = torch.zeros(4, dtype=torch.long)
    cases = [
        (lambda: pgest.linear_log_prob(hidden, weight[:, :5], a), ValueError, r"weight must be \(V, H\) with H = 6"),
        (lambda: pgest.linear_log_prob(hidden, weight.double(), a), TypeError, "weight must have the dtype"),
        (lambda: pgest.linear_log_prob(hidden, weight, a, bias=bias[:3]), ValueError, r"bias must have shape \(9,\)"),
        (lambda: pgest.linear_log_prob(hidden, weight, a, temperature=0.0), ValueError, "temperature"),
        (lambda: pgest.linear_log_prob(hidden, weight, a[:2]), ValueError, "actions must have shape"),
        (lambda: pgest.linear_log_prob(hidden, weight, torch.tensor([0, 9, 0, 0])), IndexError,
         r"actions\[1\] = 9 is out of range for 9 actions"),
        (lambda: pgest.linear_log_prob(hidden, weight, a, token_tile=0), ValueError, "token_tile must be >= 1"),
        (lambda: pgest.linear_sample(hidden, weight, num_samples=0), ValueError, "num_samples"),
        (lambda: pgest.linear_sample(hidden.to_sparse(), weight), TypeError, "dense"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    w = weight.clone()
    w[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[0, 3\] .* is nan"):
        pgest.linear_log_prob(hidden, w, a)


def test_actions_changed_before_backward_raise():
    hidden, weight, _ = make(4, 6, 9)
    a = torch.tensor([1, 2, 3, 4])
    h = hidden.clone().requires_grad_()
    lp, _ = pgest.linear_log_prob(h, weight, a)
    a.numpy()[2] = 1000
    with pytest.raises(IndexError, match="out of range"):
        lp.sum().backward()


def test_masked_vocabulary_tile():
    # a -inf bias over a whole vocabulary tile (masked tokens) is legal
    hidden, weight, bias = make(8, 4, 50)
    bias[10:30] = -math.inf
    a = torch.randint(0, 10, (8,))
    lp, ent = pgest.linear_log_prob(hidden, weight, a, bias=bias, vocab_tile=10)
    rlp, rent = materialised(hidden, weight, a, bias)
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(ent, rent)
    s = pgest.linear_sample(hidden, weight, bias=bias, vocab_tile=10, num_samples=50)
    assert not ((s.actions >= 10) & (s.actions < 30)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 3])
def test_sample_matches_sample_on_materialised_logits(dtype, S):
    N, H, V = 300, 16, 2000
    hidden, weight, bias = make(N, H, V, dtype=dtype, seed=8, scale=2.0)
    g1 = torch.Generator().manual_seed(42)
    g2 = torch.Generator().manual_seed(42)
    s = pgest.linear_sample(hidden, weight, bias=bias, num_samples=S, generator=g1, token_tile=128, vocab_tile=512)
    # 16-bit inputs: the logits the head samples from are the float32 products (not rounded to 16 bits)
    f = (lambda t: t.float()) if dtype == torch.bfloat16 else (lambda t: t)
    logits = f(hidden) @ f(weight).T + f(bias)
    ref = pgest.sample(logits, num_samples=S, generator=g2)
    mismatched = (s.actions != ref.actions).sum().item()
    # a uniform within rounding of a boundary may land on the neighbour: count
    assert mismatched <= max(1, N * S // 1000), mismatched
    # the generators advanced alike
    assert torch.equal(g1.get_state(), g2.get_state())
    # log-probs equal the trainer's bit for bit
    lp, ent = pgest.linear_log_prob(hidden, weight, s.actions, bias=bias, token_tile=128, vocab_tile=512)
    assert torch.equal(s.log_prob, lp) and torch.equal(s.entropy, ent)


def test_sample_frequencies_chi_square():
    scipy = pytest.importorskip("scipy.stats")
    H, V = 6, 700
    hidden, weight, bias = make(1, H, V, seed=9, scale=3.0)
    n = 200_000
    s = pgest.linear_sample(hidden.expand(n, H).contiguous(), weight, bias=bias,
                            generator=torch.Generator().manual_seed(1), vocab_tile=256)
    p = (hidden @ weight.T + bias).softmax(-1)[0]
    counts = torch.bincount(s.actions, minlength=V).double()
    expected = p * n
    big = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[big]).sum().item()
    dof = int(big.sum()) - 1
    assert scipy.chi2.sf(chi2, dof) > 1e-4


def memory_case(N, H, V):
    """fp32 (hidden, weight) with gradients, actions, and the bytes the
    (N, V) logits would take: the memory tests' inputs."""
    hidden, weight, _ = make(N, H, V, dtype=torch.float32, seed=10)
    return hidden.requires_grad_(), weight.requires_grad_(), torch.randint(0, V, (N,)), N * V * 4


def test_never_allocates_the_logits():
    hidden, weight, actions, logits_bytes = memory_case(2048, 64, 32000)

    def step():
        lp, ent = pgest.linear_log_prob(hidden, weight, actions, token_tile=512, vocab_tile=2048)
        (-(lp.sum()) - 0.01 * ent.sum()).backward()

    from pgest.examples.memory import largest_allocation_bytes, peak_allocated_bytes

    step()  # warm up (first-call allocations of the matmul library)
    hidden.grad = weight.grad = None
    peak, largest = peak_allocated_bytes(step), largest_allocation_bytes(step)
    grads = hidden.numel() * 4 + weight.numel() * 4
    assert largest < logits_bytes / 20, largest
    assert peak - grads < logits_bytes / 20, (peak, grads)
    # the check can fail: the materialised formula trips it
    def materialised_step():
        lp, ent = materialised(hidden, weight, actions)
        (-(lp.sum()) - 0.01 * ent.sum()).backward()

    largest_ref = largest_allocation_bytes(materialised_step)
    assert largest_ref >= logits_bytes


def test_opcheck_and_compile():
    from pgest.linear.head import linear_log_prob_backward_op, linear_log_prob_op

    hidden, weight, bias = make(6, 4, 10, dtype=torch.float32)
    a = torch.randint(0, 10, (6, 2))
    torch.library.opcheck(linear_log_prob_op, (hidden, weight, bias, a, -100, 1.0, 4, 3))
    lp, ent, st = linear_log_prob_op(hidden, weight, bias, a, -100, 1.0, 4, 3)
    torch.library.opcheck(linear_log_prob_backward_op, (torch.ones(6, 2), torch.ones(6), hidden, weight, bias, a, st,
                                                     -100, 1.0, 4, 3, [True, True, True]))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, w, b):
        lp, ent = pgest.linear_log_prob(h, w, a, bias=b)
        return -(lp.sum() + ent.sum())

    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    f(*ins).backward()
    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = pgest.linear_log_prob(*ref[:2], a, bias=ref[2])
    (-(lp.sum() + ent.sum())).backward()
    for x, y in zip(ins, ref):
        torch.testing.assert_close(x.grad, y.grad)


def test_nan_error_names_the_callers_token_when_tokens_are_ignored():
    # the statistics run on a gather of the live tokens; the error must still
    # name the caller's token (5 here, not its rank 1 among the live ones)
    hidden, weight, _ = make(8, 4, 9)
    a = torch.tensor([-100, -100, 3, -100, -100, 2, 1, -100])
    bad = hidden.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[5, 0\]"):
        pgest.linear_log_prob(bad, weight, a, token_tile=2)
    with pytest.raises(ValueError, match=r"logits\[5, 0\]"):
        pgest.linear_policy_loss(bad, weight, a, torch.ones(8), token_tile=2)


def test_a_masked_row_does_not_hide_an_inf_row_in_its_tile():
    # Row 0's logit in vocabulary tile 3 is -inf (the whole tile: legal),
    # row 1's is +inf. The kernel reports row 0 first; its statistics must
    # still come from the kernel for row 1 (which refuses +inf), not from a
    # fallback that let +inf through to the sampler (it walked off the row).
    h = torch.tensor([[1e30], [-1.0], [0.5]])
    w = torch.tensor([[-0.15], [0.3], [0.08], [-math.inf], [1.27]])
    for tn in (1, 2, 3):
        with pytest.raises(ValueError, match=r"logits\[1, 3\] .* is inf"):
            pgest.linear_sample(h, w, token_tile=tn, vocab_tile=1)
        with pytest.raises(ValueError, match=r"logits\[1, 3\] .* is inf"):
            pgest.linear_log_prob(h, w, torch.tensor([0, 1, 2]), token_tile=tn, vocab_tile=1)
        with pytest.raises(ValueError, match=r"logits\[1, 3\] .* is inf"):
            pgest.linear_policy_loss(h, w, torch.tensor([0, 1, 2]), torch.ones(3), token_tile=tn, vocab_tile=1)
    # the same with a NaN behind the masked row (0 * inf; NaN > -inf is false,
    # so it must not be taken for a masked entry)
    hn = torch.tensor([[-1.0], [0.0], [-0.5]])
    wn = torch.tensor([[-0.15], [0.3], [0.08], [math.inf], [1.27]])
    with pytest.raises(ValueError, match=r"logits\[1, 3\] .* is nan"):
        pgest.linear_log_prob(hn, wn, torch.tensor([0, 1, 2]), token_tile=3, vocab_tile=1)


def test_a_token_whose_logits_are_all_minus_inf_raises():
    # each vocabulary tile alone may be all -inf; the whole row may not
    # (pgest.log_prob raises for such a row: no action has any probability)
    hidden, weight, _ = make(4, 3, 10)
    bias = torch.full((10,), -math.inf, dtype=hidden.dtype)
    a = torch.tensor([1, 2, -100, 3])
    for call in (lambda: pgest.linear_log_prob(hidden, weight, a, bias=bias, vocab_tile=4),
                 lambda: pgest.linear_policy_loss(hidden, weight, a, torch.ones(4), bias=bias, vocab_tile=4),
                 lambda: pgest.linear_sample(hidden, weight, bias=bias, vocab_tile=4)):
        with pytest.raises(ValueError, match=r"logits\[0\] .* is all -inf"):
            call()
    masked = torch.zeros(10, dtype=hidden.dtype)
    masked[4:] = -math.inf  # two whole tiles masked: legal, and never drawn
    s = pgest.linear_sample(hidden, weight, bias=masked, num_samples=50, vocab_tile=4,
                            generator=torch.Generator().manual_seed(0))
    assert (s.actions < 4).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_keep_float32_logits(dtype):
    # verl's linear-cross-entropy tolerances (1e-3 log-prob, 5e-3 entropy)
    # against float64 logits of the same 16-bit inputs; rounding the tile
    # products to bfloat16 was off by 0.06 / 0.08 at logits of std 4
    torch.manual_seed(0)
    N, H, V = 256, 512, 8000
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * 4 / H ** 0.5).to(dtype)
    actions = torch.randint(0, V, (N,))
    x = hidden.double() @ weight.double().T
    ls = x.log_softmax(-1)
    want_lp, want_ent = ls.gather(1, actions[:, None]).squeeze(1), -(ls.exp() * ls).sum(-1)
    lp, ent = pgest.linear_log_prob(hidden, weight, actions, vocab_tile=2048)
    assert (lp.double() - want_lp).abs().max() < 1e-3
    assert (ent.double() - want_ent).abs().max() < 5e-3
    loss = pgest.linear_policy_loss(hidden, weight, actions, torch.ones(N), reduction="sum", entropy_weight=0.1)
    assert abs(loss.item() - (-want_lp.sum() - 0.1 * want_ent.sum()).item()) < 1e-3 * N
    s = pgest.linear_sample(hidden, weight, generator=torch.Generator().manual_seed(2), vocab_tile=2048)
    lp2, _ = pgest.linear_log_prob(hidden, weight, s.actions, vocab_tile=2048)
    assert torch.equal(s.log_prob, lp2)
    assert (s.log_prob.double() - ls.gather(1, s.actions[:, None]).squeeze(1)).abs().max() < 1e-3


def _capped_reference(h, w, b, c, T):
    x = h @ w.T + (0 if b is None else b)
    return c * torch.tanh(x / c) / T


@devices()
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_softcap_matches_materialised_float64(T, device):
    # Gemma 2's final soft-capping c * tanh(x / c) before the temperature, in the
    # head's pass: values, entropies and gradients against autograd on the
    # materialised capped logits (logits of std 12 against a cap of 5: the cap bites)
    g = torch.Generator().manual_seed(50)
    N, H, V, c = 13, 8, 2500, 5.0  # two vocabulary pieces
    h = (torch.randn(N, H, generator=g, dtype=torch.float64) * 2).to(device)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2).to(device)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(device)
    a = torch.randint(0, V, (N, 2), generator=g).to(device)
    a[3] = -100
    a[5, 1] = -100
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    lp, ent = pgest.linear_log_prob(ours[0], ours[1], a, bias=ours[2], temperature=T, softcap=c, token_tile=4)
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    ls = torch.log_softmax(_capped_reference(*ref, c, T), -1)
    keep = a != -100
    rlp = torch.where(keep, ls.gather(1, a.clamp(min=0)), 0.0)
    rent = torch.where(keep.any(1), -(ls.exp() * ls).sum(-1), 0.0)
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, rent, rtol=1e-12, atol=1e-12)
    (lp.sum() * 0.8 + ent.sum()).backward()
    (rlp.sum() * 0.8 + rent.sum()).backward()
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # without the cap the numbers differ (the test sees the cap)
    assert (pgest.linear_log_prob(h, w, a, bias=b, temperature=T).log_prob - lp).abs().max() > 1e-2
    # the sampler: pgest.sample's draws on the capped logits, log-probs equal to the trainer's bit for bit
    s = pgest.linear_sample(h, w, bias=b, temperature=T, softcap=c, num_samples=3,
                            generator=torch.Generator(device).manual_seed(1))
    want = pgest.sample(_capped_reference(h, w, b, c, T), num_samples=3,
                        generator=torch.Generator(device).manual_seed(1))
    assert (s.actions != want.actions).sum() <= 1
    lp2, ent2 = pgest.linear_log_prob(h, w, s.actions, bias=b, temperature=T, softcap=c)
    assert torch.equal(lp2, s.log_prob) and torch.equal(ent2, s.entropy)


def test_softcap_with_truncation_second_derivatives_and_compile():
    g = torch.Generator().manual_seed(51)
    N, H, V, c = 9, 6, 700, 4.0
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 2
    # truncated: the kept set and log-probs of pgest.log_prob on the capped logits
    s = pgest.linear_sample(h, w, softcap=c, top_p=0.8, temperature=0.9, generator=torch.Generator().manual_seed(2))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = pgest.linear_log_prob(hh, ww, s.actions, softcap=c, top_p=0.8, temperature=0.9)
    assert torch.equal(lp, s.log_prob)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    rlp, rent = pgest.log_prob(_capped_reference(hr, wr, None, c, 1.0), s.actions, top_p=0.8, temperature=0.9)
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-12)
    (lp.sum() + ent.sum()).backward()
    (rlp.sum() + rent.sum()).backward()
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ww.grad, wr.grad, rtol=1e-10, atol=1e-12)
    # second derivatives and gradcheck through the cap
    hs, ws = h[:3, :4].clone().requires_grad_(), w[:20, :4].clone().requires_grad_()
    a = torch.randint(0, 20, (3,), generator=g)
    fn = lambda x, y: pgest.linear_log_prob(x, y, a, softcap=1.5, temperature=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hs, ws))
    assert torch.autograd.gradgradcheck(fn, (hs, ws))
    # the registered op under torch.compile: the eager numbers
    hf, wf = h.float(), w.float()
    a = s.actions

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, y):
        lp, ent = pgest.linear_log_prob(x, y, a, softcap=c)
        return lp, ent

    got = f(hf, wf)
    want = pgest.linear_log_prob(hf, wf, a, softcap=c)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    from pgest.linear.head import linear_log_prob_op

    torch.library.opcheck(linear_log_prob_op, (hf[:4], wf[:50], None, a[:4, None] % 50, -100, 1.0, 4, 3, 2.5))


def test_softcap_errors():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    a = torch.zeros(3, dtype=torch.int64)
    for bad, err in ((-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), (True, TypeError),
                     ("5", TypeError)):
        with pytest.raises(err, match="softcap must be"):
            pgest.linear_log_prob(h, w, a, softcap=bad)
        with pytest.raises(err, match="softcap must be"):
            pgest.linear_sample(h, w, softcap=bad, top_k=2)
    # 0 and None are no cap
    assert torch.equal(pgest.linear_log_prob(h, w, a, softcap=0).log_prob, pgest.linear_log_prob(h, w, a).log_prob)
