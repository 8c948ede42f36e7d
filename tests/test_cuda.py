"""CUDA kernels: the same draws as the CPU for the same (seed, offset), the
reference comparison, streams, CUDA graphs, large shapes. Skipped where there
is no GPU or pgest was built without CUDA."""
import math

import pytest
import torch

import pgest
from pgest import reference
from pgest.ops.policy_loss import policy_loss_op
from pgest.ops.sample import sample_op

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and pgest.build_info()["cuda_compiled"]),
    reason="needs a GPU and a CUDA build of pgest",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _seed(value, device):
    return torch.tensor([value, 0], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 10), (300, 1000), (16, 32000), (3, 262144)])
def test_sample_same_draws_as_cpu(dtype, shape):
    x = (torch.randn(shape) * 2).to(dtype)
    x[:, 3] = -math.inf
    cpu = sample_op(x, 4, _seed(12345, "cpu"))
    gpu = sample_op(x.cuda(), 4, _seed(12345, "cuda"))
    differ = (cpu[0] != gpu[0].cpu()).any(1).sum().item()
    assert differ <= max(2, 1e-3 * shape[0]), f"{differ} rows drew other actions (float-boundary ties)"
    same = (cpu[0] == gpu[0].cpu()).all(1)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=tol, atol=tol)  # entropy
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=tol, atol=tol)  # lse
    torch.testing.assert_close(gpu[1].cpu()[same], cpu[1][same], rtol=tol, atol=tol)
    assert (gpu[0] != 3).all()


@pytest.mark.parametrize("baseline", [None, 0.3, "mean", "rloo"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reinforce_grad_matches_reference(baseline, dtype):
    B, K, S = 257, 5000, 3
    x = (torch.randn(B, K) * 2).to(dtype).cuda()
    labels = torch.randint(0, K, (B,), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    state = g.get_state()
    out = pgest.reinforce_grad(x, labels, baseline=baseline, num_samples=S, generator=g)
    g.set_state(state)
    seed = int(pgest.philox.seed_tensor(g, x.device)[0])
    u = pgest.philox.uniforms(B, S, seed, 0)
    ref = reference.reinforce_grad(x.cpu(), labels.cpu(), baseline=baseline, num_samples=S, uniforms=u)
    rows_ok = (out.actions.cpu() == ref.actions).all(1)
    assert (~rows_ok).sum() <= 2
    torch.testing.assert_close(out.grad.cpu()[rows_ok], ref.grad[rows_ok], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_equals_cross_entropy(dtype):
    logits = torch.randn(3, 7, 40000, device="cuda").to(dtype).requires_grad_()
    labels = torch.randint(0, 40000, (3, 7), device="cuda")
    labels[0, 0] = -100
    pgest.policy_loss(logits, labels, torch.ones(3, 7, device="cuda"), entropy_weight=0.0).backward()
    g, logits.grad = logits.grad.clone(), None
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, 40000), labels.reshape(-1)).backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(g.float(), logits.grad.float(), rtol=tol, atol=tol)


def test_policy_loss_backward_same_as_cpu():
    x = torch.randn(64, 3000, dtype=torch.float64)
    a = torch.randint(0, 3000, (64, 2))
    w = torch.randn(64, 2, dtype=torch.float64)
    cpu = policy_loss_op(x.requires_grad_(), a, w, 0.1, -100, None, None)[0].sum()
    cpu.backward()
    xg = x.detach().cuda().requires_grad_()
    gpu = policy_loss_op(xg, a.cuda(), w.cuda(), 0.1, -100, None, None)[0].sum()
    gpu.backward()
    torch.testing.assert_close(gpu.cpu(), cpu.detach())
    torch.testing.assert_close(xg.grad.cpu(), x.grad)


def test_returns_same_as_cpu():
    r, v = torch.randn(100, 5000), torch.randn(100, 5000)
    d = torch.rand(100, 5000) < 0.1
    last = torch.randn(5000)
    a_cpu, ret_cpu = pgest.gae(r, v, d, 0.99, 0.95, last)
    a_gpu, ret_gpu = pgest.gae(r.cuda(), v.cuda(), d.cuda(), 0.99, 0.95, last.cuda())
    torch.testing.assert_close(a_gpu.cpu(), a_cpu)
    torch.testing.assert_close(pgest.discounted_returns(r.cuda(), d.cuda(), 0.9).cpu(), pgest.discounted_returns(r, d, 0.9))


def test_non_default_stream_and_many_rows():
    x = torch.randn(70000, 12, device="cuda")  # more rows than a grid dimension of 65535
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = pgest.sample(x, num_samples=2)
    s.synchronize()
    assert out.actions.shape == (70000, 2) and (out.actions >= 0).all() and (out.actions < 12).all()


def test_cuda_graph_replays_draw_fresh_samples():
    x = torch.zeros(4096, 50, device="cuda")
    static = {}
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pgest.sample(x)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        static["a"] = pgest.sample(x).actions
    draws = []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        draws.append(static["a"].clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_errors_are_reported_from_the_device():
    x = torch.randn(5, 300, device="cuda")
    x[3, 17] = math.nan
    with pytest.raises(ValueError, match=r"logits\[3, 17\] is nan"):
        pgest.sample(x)
    with pytest.raises(IndexError, match=r"labels\[1\] = 400"):
        pgest.reinforce_grad(torch.randn(3, 300, device="cuda"), torch.tensor([0, 400, 1], device="cuda"))


def test_deferred_errors_poison_rows_then_raise_at_check():
    # the default mode: no read-back at the call; the bad row's outputs are
    # NaN (actions -1), the others exact; check_errors raises the first error
    x = torch.randn(5, 300, device="cuda")
    x[3, 17] = math.nan
    with pgest.sync_errors(False):
        out = pgest.sample(x, num_samples=2)
        gen = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.synchronize()
        assert (out.actions[3] == -1).all() and out.log_prob[3].isnan().all() and out.entropy[3].isnan()
        good = torch.tensor([0, 1, 2, 4], device="cuda")
        assert ((out.actions[good] >= 0) & (out.actions[good] < 300)).all()
        ref = torch.log_softmax(x[good].double(), -1).gather(1, out.actions[good])
        torch.testing.assert_close(out.log_prob[good].double(), ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"logits\[3, 17\] is NaN or \+inf.*earlier pgest sample call"):
            pgest.check_errors()
        pgest.check_errors()  # reported once

        # log_prob: an action out of range poisons its row forward and backward
        y = torch.randn(4, 10, device="cuda", requires_grad=True)
        actions = torch.tensor([1, 2, 10, 3], device="cuda")
        lp, ent = pgest.log_prob(y, actions, ignore_index=None)
        (lp.sum() + ent.sum()).backward()
        assert lp[2].isnan() and ent[2].isnan() and y.grad[2].isnan().all()
        assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(y.grad[[0, 1, 3]]).all()
        with pytest.raises(IndexError, match=r"actions\[2\] is out of range for 10 actions"):
            pgest.check_errors()

        # reinforce_grad: a label out of range; the refused row indexes nothing
        lp = torch.log_softmax(torch.randn(3, 300, device="cuda", generator=gen), -1)
        r = pgest.reinforce_grad(lp, torch.tensor([0, 400, 1], device="cuda"), generator=gen)
        torch.cuda.synchronize()
        assert r.actions[1] == -1 and r.rewards[1].isnan() and r.grad[1].isnan().all()
        assert torch.isfinite(r.grad[[0, 2]]).all() and ((r.grad[[0, 2]] != 0).sum(1) <= 1).all()
        with pytest.raises(IndexError, match=r"labels\[1\] = 400"):
            pgest.check_errors()

        # reinforce: its reward checks are torch ops on the device
        z = torch.randn(3, 300, device="cuda", requires_grad=True)
        out = pgest.reinforce(z, torch.tensor([0, 400, 1], device="cuda"), generator=gen)
        assert out.loss.isnan() and out.rewards[1].isnan() and torch.isfinite(out.rewards[[0, 2]]).all()
        with pytest.raises(IndexError, match=r"labels\[1\] = 400 is out of range.*earlier pgest reinforce"):
            pgest.check_errors()


def test_deferred_errors_surface_without_check_errors():
    from pgest import device_errors

    x = torch.randn(8, 50, device="cuda")
    bad = x.clone()
    bad[5] = -math.inf
    with pgest.sync_errors(False):
        pgest.sample(bad)
        with pytest.raises(ValueError, match=r"logits\[5\] is all -inf"):
            for _ in range(4 * device_errors.FLUSH_EVERY):  # a later flush reads it, once it has landed
                pgest.sample(x)
                torch.cuda.synchronize()
        assert device_errors.pending() < device_errors.FLUSH_EVERY


def test_a_training_step_never_synchronises():
    # sample, log_prob / policy_loss forward and backward, reinforce_grad, gae
    # and returns under torch's sync debug mode "error", past several flushes

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 18, device="cuda", generator=g, requires_grad=True)
    rewards, values = torch.randn(64, 8, device="cuda"), torch.randn(64, 8, device="cuda")
    dones = torch.rand(64, 8, device="cuda") < 0.1
    adv_w = torch.randn(256, device="cuda")

    def step():
        d = pgest.Categorical(logits=x)
        a = d.sample(generator=g)
        loss = (d.log_prob(a) * adv_w).mean() + d.entropy().mean()
        loss = loss + pgest.policy_loss(x, a, adv_w, entropy_weight=0.01)
        loss.backward()
        pgest.reinforce_grad(torch.log_softmax(x.detach(), -1), a, baseline="mean", generator=g)
        pgest.reinforce(x, a, baseline="mean", generator=g).loss.backward()
        pgest.gae(rewards, values, dones, 0.99, 0.95)
        pgest.discounted_returns(rewards, dones, 0.99)
        x.grad = None

    never_synchronises(step)


def never_synchronises(step):
    """Runs step once, then past several flushes of the deferred error words
    under torch's sync debug mode "error"; step's first result."""
    from pgest import device_errors

    with pgest.sync_errors(False):
        first = step()  # first calls: allocator pools, pinned buffers, kernel loading
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2 * device_errors.FLUSH_EVERY):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        pgest.check_errors()
    return first


def test_cuda_graph_capture_of_a_step_with_a_bad_row():
    # captured once, replayed: fresh draws at each replay, right log-probs;
    # a NaN row put into the static input later shows as poisoned outputs
    x = torch.randn(512, 40, device="cuda")
    rewards, values = torch.randn(32, 16, device="cuda"), torch.randn(32, 16, device="cuda")
    dones = torch.zeros(32, 16, dtype=torch.bool, device="cuda")
    static = {}

    def step():
        s = pgest.sample(x)
        lp, ent = pgest.log_prob(x, s.actions)
        static.update(a=s.actions, lp=lp, ent=ent, r=pgest.reinforce_grad(torch.log_softmax(x, -1), s.actions).grad,
                      adv=pgest.gae(rewards, values, dones, 0.99, 0.95)[0])

    with pgest.sync_errors(False):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        draws = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            draws.append(static["a"].clone())
            ref = torch.log_softmax(x.double(), -1).gather(1, static["a"][:, None]).squeeze(1)
            torch.testing.assert_close(static["lp"].double(), ref, rtol=1e-5, atol=1e-5)
        assert not torch.equal(draws[0], draws[1])
        x[9, 3] = math.nan
        graph.replay()
        torch.cuda.synchronize()
        assert static["a"][9] == -1 and static["lp"][9].isnan() and static["r"][9].isnan().all()
        assert (static["a"][:9] >= 0).all() and torch.isfinite(static["lp"][:9]).all()
        x[9, 3] = 0.0
        pgest.check_errors()  # nothing was deferred from inside the graph


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_on_another_device():
    x = torch.randn(100, 1000, device="cuda:1")
    with torch.cuda.device(0):
        out = pgest.sample(x)
    assert out.actions.device == x.device


def gpu_head(dtype, seed, N=700, H=64, V=32001):
    """(hidden, weight) on the GPU with gradients, actions, and the CPU
    generator that drew them (for further draws)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).cuda().requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 8).to(dtype).cuda().requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g).cuda(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_head_on_gpu(dtype):
    # the fused linear head on CUDA: cuBLAS tiles + the CUDA row kernels,
    # against the materialised formula on the GPU, and its sampler against
    # pgest.sample on the materialised logits with the same generator state
    hidden, weight, actions, _ = gpu_head(dtype, seed=0)
    lp, ent = pgest.linear_log_prob(hidden, weight, actions, token_tile=256, vocab_tile=4096)
    (lp.sum() + ent.sum()).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ls = (h2 @ w2.T).float().log_softmax(-1)
    rlp = ls.gather(1, actions[:, None]).squeeze(1)
    rent = -(ls.exp() * ls).sum(-1)
    (rlp.sum() + rent.sum()).backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lp, rlp, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, rent, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), rtol=tol, atol=tol)
    gen1 = torch.Generator(device="cuda").manual_seed(3)
    gen2 = torch.Generator(device="cuda").manual_seed(3)
    s = pgest.linear_sample(hidden.detach(), weight.detach(), num_samples=2, generator=gen1)
    ref = pgest.sample(hidden.detach() @ weight.detach().T, num_samples=2, generator=gen2)
    assert (s.actions != ref.actions).sum().item() <= 2
    lp2, _ = pgest.linear_log_prob(hidden.detach(), weight.detach(), s.actions)
    assert torch.equal(lp2, s.log_prob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_policy_loss_on_gpu(dtype):
    # the three-product route on CUDA against pgest.policy_loss on the
    # materialised logits (both on the GPU), with an upstream scalar != 1
    hidden, weight, actions, g = gpu_head(dtype, seed=1)
    N = hidden.shape[0]
    actions[7] = -100
    adv = torch.randn(N, generator=g).cuda()
    loss = pgest.linear_policy_loss(hidden, weight, actions, adv, entropy_weight=0.01, token_tile=256,
                                    vocab_tile=4096)
    (2 * loss).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = pgest.policy_loss(h2 @ w2.T, actions, adv, entropy_weight=0.01)
    (2 * ref).backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncation_kernel_keeps_the_cpu_set(dtype):
    # the CUDA kernel (radix descent) against the CPU kernel: threshold, kept
    # and cut bit for bit wherever no cumulative mass is within rounding of
    # top_p, the kept mass to rounding; greedy rows, ties, -inf tails
    from pgest.ops.truncation import truncation_op

    g = torch.Generator().manual_seed(5)
    R, K = 64, 50000
    x = (torch.randn(R, K, generator=g) * 3).to(dtype)
    x[0, K // 2:] = -math.inf
    x[1] = torch.randint(-3, 4, (K,), generator=g).to(dtype)
    params = (torch.rand(R, dtype=torch.float64, generator=g) + 0.3, torch.randint(0, 300, (R,), generator=g),
              torch.rand(R, dtype=torch.float64, generator=g) * 0.5 + 0.5,
              torch.rand(R, dtype=torch.float64, generator=g) * 0.02)
    params[0][2] = 0.0  # greedy
    cpu = truncation_op(x, *params)
    gpu = [t.cpu() for t in truncation_op(x.cuda(), *(p.cuda() for p in params))]
    same = (cpu[0] == gpu[0]) & (cpu[1] == gpu[1]) & (cpu[3] == gpu[3])
    assert same.sum() >= R - 2, f"{R - int(same.sum())} rows kept another set (top_p within rounding)"
    torch.testing.assert_close(gpu[2][same], cpu[2][same], rtol=1e-5, atol=1e-9)


def test_truncated_sampling_and_scoring_agree_and_never_synchronise():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(512, 32000, device="cuda", generator=g, requires_grad=True)
    kw = dict(temperature=0.7, top_k=50, top_p=0.95)

    def step():
        s = pgest.sample(x.detach(), generator=g, **kw)
        lp, ent = pgest.log_prob(x, s.actions, **kw)
        (lp.sum() + 0.01 * ent.sum()).backward()
        x.grad = None
        return s, lp

    s, lp = never_synchronises(step)
    assert torch.equal(s.log_prob, lp.detach())  # sampler and trainer, bit for bit
