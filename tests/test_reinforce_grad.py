"""pgest.reinforce_grad against the reference (driven by the kernel's own
noise), against independent facts (the seed's formula, softmax frequencies,
the exact gradient of expected reward), and on bad input."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOAT_DTYPES, TOL, devices, on_each_device, run_with_noise

import pgest
from pgest import _C, reference

BASELINES = [None, 0.3, "tensor", "mean", "rloo"]
REWARDS = ["labels", "table", "vector"]


def make_inputs(B, K, dtype, reward_kind, baseline, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K, generator=g) * scale).to(dtype)
    kw = {}
    if reward_kind == "labels":
        args = (logits, torch.randint(0, K, (B,), generator=g))
    else:
        args = (logits,)
        shape = (B, K) if reward_kind == "table" else (K,)
        kw["reward_table"] = torch.rand(shape, generator=g) * 2 - 0.5
    kw["baseline"] = torch.rand(B, generator=g) if baseline == "tensor" else baseline
    return args, kw


def assert_matches_reference(out, ref, dtype, max_mismatch_frac=1e-3):
    """Actions equal except where a uniform lands on a float boundary (counted,
    and bounded); rewards and gradients equal on the rows whose draws agree."""
    a, r = out.actions.view(out.actions.shape[0], -1), ref.actions.view(ref.actions.shape[0], -1)
    rows_ok = (a == r).all(1)
    mismatched = (~rows_ok).sum().item()
    assert mismatched <= max(2, max_mismatch_frac * a.shape[0]), f"{mismatched} rows drew other actions"
    assert torch.equal(out.rewards.view_as(a)[rows_ok], ref.rewards.view_as(r)[rows_ok])
    torch.testing.assert_close(out.grad[rows_ok], ref.grad[rows_ok], **TOL[dtype])


@pytest.mark.parametrize(
    "dtype,baseline,reward_kind,num_samples",
    [
        c for c in itertools.product(FLOAT_DTYPES, BASELINES, REWARDS, [1, 3])
        if not (c[1] == "rloo" and c[3] == 1)
    ],
)
def test_matches_reference(dtype, baseline, reward_kind, num_samples):
    B, K = 97, 300
    args, kw = make_inputs(B, K, dtype, reward_kind, baseline)
    out, u = run_with_noise(pgest.reinforce_grad, *args, num_samples=num_samples, **kw)
    ref = reference.reinforce_grad(*args, num_samples=num_samples, uniforms=u, **kw)
    assert out.actions.dtype == torch.int64 and out.rewards.dtype == torch.float32
    assert out.grad.dtype == dtype and out.grad.shape == (B, K)
    expected_shape = (B,) if num_samples == 1 else (B, num_samples)
    assert out.actions.shape == expected_shape and out.rewards.shape == expected_shape
    assert_matches_reference(out, ref, dtype)


@devices()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("baseline,reward_kind,num_samples",
                         [(None, "labels", 1), ("tensor", "table", 1), ("mean", "vector", 3), ("rloo", "labels", 4)])
def test_gradient_is_the_formula_of_its_own_draws(device, dtype, baseline, reward_kind, num_samples):
    """On every device (the GPU draws from its own generator, so no shared
    uniforms): rewards and the one-hot gradient follow, written out here in
    float64, from the actions the kernel drew."""
    B, K = 97, 300
    args, kw = make_inputs(B, K, dtype, reward_kind, baseline)
    on = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = pgest.reinforce_grad(*map(on, args), num_samples=num_samples,
                               generator=torch.Generator(device).manual_seed(5), **{k: on(v) for k, v in kw.items()})
    a = out.actions.cpu().view(B, num_samples)
    assert ((a >= 0) & (a < K)).all()
    if reward_kind == "labels":
        r = (a == args[1][:, None]).double()
    else:
        table = kw["reward_table"].double()
        r = table.expand(B, K).gather(1, a)
    torch.testing.assert_close(out.rewards.cpu().view(B, num_samples).double(), r, rtol=1e-6, atol=1e-7)
    b = kw["baseline"]
    if b is None:
        bv = torch.zeros_like(r)
    elif b == "mean":
        bv = r.mean().expand_as(r)  # over the whole batch and its samples
    elif b == "rloo":
        bv = (r.sum(1, keepdim=True) - r) / (num_samples - 1)
    else:
        bv = b.double()[:, None].expand_as(r)
    grad = torch.zeros(B, K, dtype=torch.float64).scatter_add_(1, a, (bv - r) / (B * num_samples))
    torch.testing.assert_close(out.grad.cpu(), grad.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("shape", [(4096, 10), (1024, 1000), (16, 32000), (3, 128000), (5, 257), (7, 1)])
def test_shapes_match_reference(shape):
    args, kw = make_inputs(*shape, torch.float32, "labels", "mean")
    out, u = run_with_noise(pgest.reinforce_grad, *args, **kw)
    ref = reference.reinforce_grad(*args, uniforms=u, **kw)
    assert_matches_reference(out, ref, torch.float32)


@on_each_device
def test_seed_formula_one_hot_gradient():
    """With S = 1 the gradient is the seed's (baseline - reward) / B times the
    one-hot of the action, computed here from the kernel's own actions."""
    B, K = 256, 10
    logits = torch.randn(B, K)
    log_probs = logits.log_softmax(-1)
    labels = torch.randint(0, K, (B,))
    baseline = torch.sigmoid(torch.randn(B))
    out = pgest.reinforce_grad(log_probs, labels, baseline=baseline)
    rewards = (out.actions == labels).float()
    assert torch.equal(out.rewards, rewards)
    expected = ((baseline - rewards) / B)[:, None] * F.one_hot(out.actions, K)
    torch.testing.assert_close(out.grad, expected.float(), rtol=1e-6, atol=0)


@on_each_device
def test_seed_training_step_gradients():
    """The seed's step 3 through a model: log_probs.backward(out.grad) gives
    the parameter gradients the seed's listing gives for the same actions, and
    the learned baseline is used without being differentiated."""
    torch.manual_seed(0)
    B, n_classes = 64, 10
    model = torch.nn.Linear(20, n_classes + 1)
    inputs, labels = torch.randn(B, 20), torch.randint(0, n_classes, (B,))

    outputs = model(inputs)
    baseline = torch.sigmoid(outputs[:, -1])  # requires grad, non-contiguous view
    log_probs = torch.log_softmax(outputs[:, :n_classes], -1)
    out = pgest.reinforce_grad(log_probs, labels, baseline=baseline)
    log_probs.backward(out.grad)
    ours = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    outputs = model(inputs)
    baseline = torch.sigmoid(outputs[:, -1])
    log_probs = torch.log_softmax(outputs[:, :n_classes], -1)
    with torch.no_grad():
        rewards = (out.actions == labels).float()
        gradients = (baseline - rewards) / B
        one_hot_gradients = gradients[:, None] * F.one_hot(out.actions, n_classes)
    log_probs.backward(one_hot_gradients)
    for a, b in zip(ours, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frequencies_follow_softmax(dtype):
    """Chi-square of 200k draws against softmax; a -inf action is never drawn."""
    scipy_stats = pytest.importorskip("scipy.stats")
    K, B, S = 12, 2000, 100
    row = torch.linspace(-2.0, 1.5, K)
    row[3] = -math.inf
    x = row.to(dtype).expand(B, K)  # stride 0 rows: also a strided input
    out = pgest.reinforce_grad(x, reward_table=torch.zeros(K), num_samples=S,
                               generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(out.actions.flatten(), minlength=K).double()
    assert counts[3] == 0
    p = torch.softmax(row.to(dtype).double(), 0)  # the distribution of the rounded scores
    live = p > 0
    chi2 = (((counts - p * B * S) ** 2) / (p * B * S))[live].sum().item()
    pvalue = scipy_stats.chi2.sf(chi2, int(live.sum()) - 1)
    assert pvalue > 1e-4, f"chi2 = {chi2}, p = {pvalue}"


@pytest.mark.parametrize("baseline", [None, "mean", "rloo"])
def test_estimator_is_unbiased(baseline):
    """Backpropagated through log_softmax, the mean gradient over many rows of
    the same policy equals the exact gradient of -E[reward]:
    -(p * R - p * (p . R)), within a 5-sigma bound per entry."""
    K, B, S = 6, 40000, 2
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.5, 1.0], dtype=torch.float64)
    R = torch.tensor([1.0, 0.0, 0.2, 0.7, -0.3, 0.4], dtype=torch.float64)
    x = logits.expand(B, K)
    out = pgest.reinforce_grad(x, reward_table=R, baseline=baseline, num_samples=S,
                               generator=torch.Generator().manual_seed(2))
    p = torch.softmax(logits, 0)
    # d loss / d logits = g - p * sum(g) per row, and the op already divides by B * S.
    per_row = (out.grad - p * out.grad.sum(1, keepdim=True)) * B
    estimate, stderr = per_row.mean(0), per_row.std(0) / math.sqrt(B)
    exact = -(p * R - p * (p @ R))
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-12).all(), (estimate, exact, stderr)


def test_baselines_reduce_variance():
    K, B, S = 6, 20000, 4
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.5, 1.0])
    R = torch.tensor([1.0, 0.0, 0.2, 0.7, -0.3, 0.4]) + 3.0  # an offset a baseline removes
    x = logits.expand(B, K)
    var = {}
    for b in [None, "mean", "rloo"]:
        g = pgest.reinforce_grad(x, reward_table=R, baseline=b, num_samples=S,
                                 generator=torch.Generator().manual_seed(3)).grad
        var[b] = (g * B).var(0).sum().item()
    assert var["mean"] < 0.2 * var[None] and var["rloo"] < 0.2 * var[None]


def test_thread_count_and_isa_do_not_change_draws():
    """A row's draw depends on the seed and the row, not on the thread count."""
    x = torch.randn(257, 3001)
    x[:, ::5] = -math.inf
    labels = torch.randint(0, 3001, (257,))
    threads = torch.get_num_threads()
    isa = _C.cpu_isa()
    results = []
    try:
        for n, name in itertools.product([1, 2, 3], ["generic", "avx2", "avx512"]):
            if not _C.cpu_isa_usable(name):
                continue
            torch.set_num_threads(n)
            assert _C.set_cpu_isa(name)
            out = pgest.reinforce_grad(x, labels, num_samples=3, baseline="rloo",
                                       generator=torch.Generator().manual_seed(9))
            results.append((n, name, out))
    finally:
        torch.set_num_threads(threads)
        _C.set_cpu_isa(isa)
    # AVX2 and AVX-512 use the same fused multiply-adds: the same bits for any
    # thread count. The baseline x86-64 copy has no FMA, so it may differ where
    # a uniform lands on a float boundary between two actions: counted.
    fma = [(n, name, out) for n, name, out in results if name != "generic"]
    for n, name, out in fma[1:]:
        assert torch.equal(out.actions, fma[0][2].actions), (n, name)
        assert torch.equal(out.grad, fma[0][2].grad), (n, name)
    generic = [out for n, name, out in results if name == "generic"]
    for out in generic[1:]:
        assert torch.equal(out.actions, generic[0].actions)
    if fma and generic:
        assert (fma[0][2].actions != generic[0].actions).any(1).sum() <= 2


def test_non_contiguous_inputs():
    B, K = 64, 500
    base = torch.randn(K, B * 2)
    x = base.t()[::2]  # column stride != 1, row stride 2
    assert x.stride(1) != 1
    labels = torch.randint(0, K, (B * 3,))[::3]
    table = torch.rand(K, B).t()
    bl = torch.rand(B, 2)[:, 1]
    for kw in [dict(labels=labels, baseline=bl), dict(reward_table=table, baseline="mean")]:
        strided = pgest.reinforce_grad(x, num_samples=2, generator=torch.Generator().manual_seed(4), **kw)
        dense_kw = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        dense = pgest.reinforce_grad(x.contiguous(), num_samples=2,
                                     generator=torch.Generator().manual_seed(4), **dense_kw)
        assert torch.equal(strided.actions, dense.actions)
        assert torch.equal(strided.grad, dense.grad)


@on_each_device
def test_empty_batch_and_single_action():
    out = pgest.reinforce_grad(torch.empty(0, 5), torch.empty(0, dtype=torch.long))
    assert out.actions.shape == (0,) and out.grad.shape == (0, 5)
    out = pgest.reinforce_grad(torch.empty(0, 5), torch.empty(0, dtype=torch.long), num_samples=3)
    assert out.actions.shape == (0, 3)
    out = pgest.reinforce_grad(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long), baseline=0.25)
    assert (out.actions == 0).all() and (out.rewards == 1).all()
    torch.testing.assert_close(out.grad, torch.full((8, 1), (0.25 - 1) / 8))


def test_rows_of_very_different_scales():
    B, K = 6, 2000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, K, generator=g) * torch.tensor([1e-6, 1e-2, 1.0, 30.0, 1e3, 1e6])[:, None]
    x[1] += 1e4  # a large offset: normalisation is the kernel's job
    args, kw = (x, torch.randint(0, K, (B,), generator=g)), {"baseline": "mean"}
    out, u = run_with_noise(pgest.reinforce_grad, *args, num_samples=50, **kw)
    ref = reference.reinforce_grad(*args, num_samples=50, uniforms=u, **kw)
    assert_matches_reference(out, ref, torch.float32, max_mismatch_frac=0)
    # the huge-scale row is (nearly) deterministic: its argmax
    assert (out.actions[5] == x[5].argmax()).all()


@on_each_device
def test_subnormal_and_tiny_probabilities():
    x = torch.full((1000, 4), -math.inf)
    x[:, 0], x[:, 1] = 0.0, -80.0  # exp(-80) ~ 1.8e-35: never drawn by a 53-bit uniform
    out = pgest.reinforce_grad(x, reward_table=torch.ones(4), num_samples=10)
    assert (out.actions == 0).all()
    h = torch.tensor([[6e-8, 0.0, -6e-8]], dtype=torch.float16).expand(3000, 3)  # subnormal halves
    out = pgest.reinforce_grad(h, reward_table=torch.ones(3), num_samples=3)
    counts = torch.bincount(out.actions.flatten(), minlength=3)
    assert (counts > 2500).all()


def test_row_offsets_are_64_bit():
    """Rows 2^31 + 1 elements apart, read through a lazily committed buffer:
    a 32-bit row offset would read the wrong memory."""
    K = 64
    stride = 2**31 + 1
    try:
        big = torch.empty(stride + K, dtype=torch.float32)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space")
    x = big.as_strided((2, K), (stride, 1))
    x[0] = torch.full((K,), -math.inf)
    x[0, 5] = 0.0
    x[1] = torch.full((K,), -math.inf)
    x[1, 40] = 0.0
    out = pgest.reinforce_grad(x, reward_table=torch.ones(K), num_samples=4)
    assert (out.actions[0] == 5).all() and (out.actions[1] == 40).all()


@pytest.mark.slow
def test_more_than_2_31_elements():
    B, K = 2**31 // 50000 + 2, 50000
    x = torch.full((B, K), -30.0, dtype=torch.bfloat16)
    x[-1, -1] = 30.0
    labels = torch.full((B,), K - 1)
    out = pgest.reinforce_grad(x, labels)
    assert out.actions[-1].item() == K - 1 and out.rewards[-1].item() == 1.0
    assert out.grad[-1, -1].item() == pytest.approx(-1.0 / B, rel=1e-2)


# ---- bad input ---------------------------------------------------------------

def _ok():
    return torch.randn(4, 5), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, l: pgest.reinforce_grad(x.numpy(), l), TypeError, "log_probs must be a torch.Tensor"),
        (lambda x, l: pgest.reinforce_grad(x.long(), l), TypeError, "log_probs must be float32"),
        (lambda x, l: pgest.reinforce_grad(x[0], l), ValueError, r"log_probs must be 2-D"),
        (lambda x, l: pgest.reinforce_grad(torch.empty(4, 0), l), ValueError, "K = 0"),
        (lambda x, l: pgest.reinforce_grad(x), ValueError, "exactly one of labels and reward_table"),
        (lambda x, l: pgest.reinforce_grad(x, l, reward_table=x), ValueError, "exactly one"),
        (lambda x, l: pgest.reinforce_grad(x, l.float()), TypeError, "labels must be an integer"),
        (lambda x, l: pgest.reinforce_grad(x, l[:3]), ValueError, r"labels must have shape \(4,\)"),
        (lambda x, l: pgest.reinforce_grad(x, l.view(2, 2)), ValueError, "labels must have shape"),
        (lambda x, l: pgest.reinforce_grad(x, torch.tensor([0, 1, 5, 3])), IndexError, r"labels\[2\] = 5"),
        (lambda x, l: pgest.reinforce_grad(x, torch.tensor([0, -1, 2, 3])), IndexError, r"labels\[1\] = -1"),
        (lambda x, l: pgest.reinforce_grad(x, reward_table=torch.ones(4, 4)), ValueError, "reward_table must have shape"),
        (lambda x, l: pgest.reinforce_grad(x, reward_table=torch.ones(5, dtype=torch.long)), TypeError, "reward_table must be float"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline="median"), ValueError, "'median'"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline="rloo"), ValueError, "num_samples >= 2"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline=torch.ones(3)), ValueError, r"baseline tensor must have shape \(4,\)"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline=torch.ones(4, dtype=torch.long)), TypeError, "baseline must be float"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline=[0.1]), TypeError, "baseline must be None"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline=True), TypeError, "bool"),
        (lambda x, l: pgest.reinforce_grad(x, l, baseline=float("nan")), ValueError, "baseline must be finite"),
        (lambda x, l: pgest.reinforce_grad(x, l, num_samples=0), ValueError, "num_samples must be >= 1"),
        (lambda x, l: pgest.reinforce_grad(x, l, num_samples=2.0), TypeError, "num_samples must be an int"),
    ],
)
@on_each_device
def test_bad_arguments(call, exc, match):
    x, l = _ok()
    with pytest.raises(exc, match=match):
        call(x, l)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("K", [5, 300, 1000])
@on_each_device
def test_nonfinite_rows_are_reported(dtype, bad, K):
    x = torch.randn(40, K).to(dtype)
    x[17, K - 2] = bad
    x[30, 1] = bad
    with pytest.raises(ValueError, match=rf"log_probs\[17, {K - 2}\] is {bad}"):
        pgest.reinforce_grad(x, torch.zeros(40, dtype=torch.long))


@on_each_device
def test_nan_among_neg_inf_is_reported():
    x = torch.full((3, 600), -math.inf)
    x[:, 0] = 0.0
    x[2, 300] = math.nan
    with pytest.raises(ValueError, match=r"log_probs\[2, 300\] is nan"):
        pgest.reinforce_grad(x, torch.zeros(3, dtype=torch.long))


@on_each_device
def test_all_neg_inf_row_is_reported():
    x = torch.randn(6, 700)
    x[4] = -math.inf
    with pytest.raises(ValueError, match=r"log_probs\[4\] is all -inf"):
        pgest.reinforce_grad(x, torch.zeros(6, dtype=torch.long))


@on_each_device
def test_nonfinite_reward_and_baseline_are_reported():
    x = torch.zeros(3, 1)
    with pytest.raises(ValueError, match=r"reward_table\[0\] is nan"):
        pgest.reinforce_grad(x, reward_table=torch.tensor([math.nan]))
    with pytest.raises(ValueError, match=r"reward_table\[1, 0\] is inf"):
        pgest.reinforce_grad(x, reward_table=torch.tensor([[1.0], [math.inf], [0.0]]))
    with pytest.raises(ValueError, match=r"baseline\[2\] is nan"):
        pgest.reinforce_grad(x, torch.zeros(3, dtype=torch.long), baseline=torch.tensor([0.0, 1.0, math.nan]))


def test_cuda_tensor_without_cuda_kernels():
    if not torch.cuda.is_available() or pgest.build_info()["cuda_compiled"]:
        pytest.skip("needs a GPU and a build without CUDA kernels")
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises((RuntimeError, NotImplementedError), match="log_probs is on cuda"):
        pgest.reinforce_grad(x, torch.zeros(4, dtype=torch.long, device="cuda"))


def test_device_mismatch():
    x = torch.randn(4, 5)
    lab = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels is on meta but log_probs is on cpu"):
        pgest.reinforce_grad(x, lab)


def test_large_output_zero_filled_with_streaming_stores():
    """Past 16 MiB the gradient is zero-filled around the cache; same result."""
    B, K = 41, 128001
    args, kw = make_inputs(B, K, torch.float32, "labels", "mean")
    out, u = run_with_noise(pgest.reinforce_grad, *args, **kw)
    ref = reference.reinforce_grad(*args, uniforms=u, **kw)
    assert_matches_reference(out, ref, torch.float32)
    assert (out.grad != 0).sum() <= B


@pytest.mark.parametrize("profile", ["rising", "late_jump", "falling"])
def test_rows_whose_max_moves_between_chunks(profile):
    """The chunk pass sums relative to the running max and rescales when a
    later chunk rises above it (recomputing when it rises far); all three must
    draw what the reference draws."""
    B, K = 50, 5000
    base = {
        "rising": torch.linspace(-300.0, 60.0, K),        # every chunk a little higher
        "late_jump": torch.cat([torch.full((K - 300,), -100.0), torch.full((300,), 50.0)]),
        "falling": torch.linspace(60.0, -300.0, K),
    }[profile]
    g = torch.Generator().manual_seed(8)
    x = base + torch.randn(B, K, generator=g)
    args, kw = (x, torch.randint(0, K, (B,), generator=g)), {"baseline": "mean"}
    out, u = run_with_noise(pgest.reinforce_grad, *args, num_samples=20, **kw)
    ref = reference.reinforce_grad(*args, num_samples=20, uniforms=u, **kw)
    assert_matches_reference(out, ref, torch.float32, max_mismatch_frac=0)


def _rg_module():
    import sys
    return sys.modules["pgest.ops.reinforce_grad"]  # its warn-once state


def test_float64_values_beyond_float32_say_so():
    # Checked as the float32 the kernel keeps rewards in, not before narrowing.
    x = torch.zeros(3, 4).log_softmax(-1)
    with pytest.raises(ValueError, match=r"reward_table\[0, \d\] = 1e\+39 .*overflows float32"):
        pgest.reinforce_grad(x, reward_table=torch.full((3, 4), 1e39, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reward_table\[\d\] = -1e\+39 .*overflows float32"):
        pgest.reinforce_grad(x, reward_table=torch.full((4,), -1e39, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"baseline\[1\] = 1e\+39 overflows float32"):
        pgest.reinforce_grad(x, torch.zeros(3, dtype=torch.long),
                             baseline=torch.tensor([0.0, 1e39, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="baseline 1e\\+39 overflows float32"):
        pgest.reinforce_grad(x, torch.zeros(3, dtype=torch.long), baseline=1e39)
    # the largest float32 itself is fine
    out = pgest.reinforce_grad(x, reward_table=torch.full((4,), 3.0e38, dtype=torch.float64))
    assert torch.isfinite(out.rewards).all()


def test_uint64_labels_above_int64_are_reported_as_passed():
    x = torch.zeros(3, 4).log_softmax(-1)
    labels = torch.tensor([0, 1, 2**63 + 5], dtype=torch.uint64)
    with pytest.raises(IndexError, match=r"labels\[2\] = 9223372036854775813 is out of range for 4 actions"):
        pgest.reinforce_grad(x, labels)
    out = pgest.reinforce_grad(x, torch.tensor([0, 1, 3], dtype=torch.uint64))
    assert out.actions.shape == (3,)


def test_unnormalised_input_warns_once(monkeypatch):
    mod = _rg_module()
    monkeypatch.setattr(mod, "_warned_unnormalised", False)
    mod._UNNORMALISED.zero_()  # earlier tests passed raw logits
    labels = torch.zeros(8, dtype=torch.long)
    logits = torch.randn(8, 10) + 3.0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in FLOAT_DTYPES:  # log_softmax output in every dtype is normalised enough
            pgest.reinforce_grad(torch.randn(64, 3000).log_softmax(-1).to(dtype), torch.zeros(64, dtype=torch.long))
    with pytest.warns(UserWarning, match="not normalised.*log_softmax.*pgest.reinforce"):
        pgest.reinforce_grad(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        pgest.reinforce_grad(logits, labels)


@on_each_device
def test_many_samples_of_a_row_group_like_a_bincount():
    # S above the pairwise limit: samples are grouped by sorting. The gradient
    # must be the per-action sum of (b - r) / (B * S), as a bincount gives.
    torch.manual_seed(0)
    x = torch.randn(3, 7).log_softmax(-1).double()
    table = torch.randn(3, 7, dtype=torch.float64)
    S = 1000
    out = pgest.reinforce_grad(x, reward_table=table, baseline="rloo", num_samples=S)
    r = table.gather(1, out.actions).float().double()
    b = (r.sum(1, keepdim=True) - r) / (S - 1)
    for i in range(3):
        expect = torch.bincount(out.actions[i], weights=(b - r)[i] / (3 * S), minlength=7)
        torch.testing.assert_close(out.grad[i], expect, rtol=1e-12, atol=1e-15)


@on_each_device
def test_registered_op_checks_its_arguments():
    x, l = _ok()
    seed = torch.tensor([1, 0])
    op = torch.ops.pgest.reinforce_grad
    cases = [
        (lambda: op(x, l[:2], None, 0, 0.0, None, 1, seed), ValueError, r"labels must have shape \(4,\)"),
        (lambda: op(x, None, torch.ones(3, 2), 0, 0.0, None, 1, seed), ValueError, "reward_table must have shape"),
        (lambda: op(x, l, None, 2, 0.0, None, 1, seed), ValueError, "baseline_kind 2 needs one"),
        (lambda: op(x, l, None, 2, 0.0, torch.ones(9), 1, seed), ValueError, r"baseline tensor must have shape \(4,\)"),
        (lambda: op(x, l, None, 7, 0.0, None, 1, seed), ValueError, "baseline_kind must be one of"),
        (lambda: op(x, l, None, 4, 0.0, None, 1, seed), ValueError, "num_samples >= 2"),
        (lambda: op(x, l, None, 0, 0.0, None, 0, seed), ValueError, "num_samples must be >= 1"),
        (lambda: op(x, l, None, 0, 0.0, None, 1, torch.tensor([1])), ValueError, "seed must be a \\(2,\\) int64"),
        (lambda: op(x, torch.tensor([0, 9, 0, 0]), None, 0, 0.0, None, 1, seed), IndexError, r"labels\[1\] = 9"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_opcheck_and_compile_fullgraph():
    from pgest.ops.reinforce_grad import reinforce_grad_op

    x = torch.randn(6, 5).log_softmax(-1)
    l = torch.randint(0, 5, (6,))
    seed = torch.tensor([123, 0])
    torch.library.opcheck(reinforce_grad_op, (x, l, None, 3, 0.0, None, 2, seed))
    torch.library.opcheck(reinforce_grad_op, (x, None, torch.rand(5), 2, 0.0, torch.rand(6), 1, seed))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, l):
        return pgest.reinforce_grad(x, l, baseline="mean", num_samples=3)

    torch.manual_seed(5)
    got = step(x, l)
    torch.manual_seed(5)
    want = pgest.reinforce_grad(x, l, baseline="mean", num_samples=3)
    assert torch.equal(got.actions, want.actions)
    assert torch.equal(got.grad, want.grad)


def test_transforms_and_sparse_inputs_get_a_message():
    x, l = _ok()
    with pytest.raises(NotImplementedError, match="draws random actions and does not run under torch.func.vmap"):
        torch.vmap(lambda x: pgest.reinforce_grad(x, l).grad, randomness="different")(x.unsqueeze(0))
    with pytest.raises(TypeError, match="log_probs must be a dense tensor.*to_dense"):
        pgest.reinforce_grad(x.to_sparse(), l)
    with pytest.raises(TypeError, match="labels must be a dense tensor"):
        pgest.reinforce_grad(x, l.to_sparse())
