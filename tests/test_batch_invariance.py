"""A token's numbers on logits do not depend on the batch: one row alone and
the same row at any position of a batch (with padding rows around it), for 1
or 2 threads, in every float dtype, give the same bits: log-prob, entropy,
their gradient, the draw for a given uniform, and the truncated versions.
The fused head likewise, for any token and vocabulary tiles: its products
on a multiple of 4 rows (pgest/linear/tiles.py, the platform property
checked first here), its statistics on a fixed vocabulary grid."""
import math
import os

import pytest
import torch
from helpers import FLOAT_DTYPES, devices
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgest
from pgest.ops.sample import sample_native

# PGEST_EXAMPLES=300 for a deeper local search than CI's
SETTINGS = settings(max_examples=int(os.environ.get("PGEST_EXAMPLES", 30)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def same_bits(a, b):
    return torch.equal(a, b) or (a.dtype.is_floating_point and torch.equal(a.view(torch.int8 if a.element_size() == 1
                                                                                      else a.dtype), b))


def one_and_in_batch(K, batch, position, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(batch, K, generator=g) * 3).to(dtype)
    rows[:, min(K - 1, 2)] = -math.inf if K > 3 else rows[:, min(K - 1, 2)]
    actions = torch.randint(0, K, (batch,), generator=g)
    actions[(position + 1) % batch] = -100 if batch > 1 else actions[(position + 1) % batch]  # padding around it
    if K > 3:
        actions = torch.where(actions == 2, torch.zeros_like(actions), actions)
    return rows, actions


@SETTINGS
@given(K=st.sampled_from([2, 7, 33, 300, 4097]), batch=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from(FLOAT_DTYPES), threads=st.sampled_from([1, 2]),
       truncate=st.sampled_from([None, dict(temperature=0.7, top_p=0.9), dict(top_k=3, min_p=0.01)]))
def test_log_prob_entropy_and_gradient_of_a_row_alone_and_in_a_batch(K, batch, data, dtype, threads, truncate):
    position = data.draw(st.integers(0, batch - 1))
    rows, actions = one_and_in_batch(K, batch, position, dtype, seed=K * 1000 + batch)
    kw = truncate or {}
    if truncate:  # actions inside the kept set
        s = pgest.sample(rows, generator=torch.Generator().manual_seed(0), **kw)
        actions = torch.where(actions == -100, actions, s.actions)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x_all = rows.clone().requires_grad_()
        lp_all, ent_all = pgest.log_prob(x_all, actions, **kw)
        (lp_all.sum() + 0.3 * ent_all.sum()).backward()
        torch.set_num_threads(1 if threads == 2 else 2)
        one = rows[position:position + 1].clone().requires_grad_()
        lp1, ent1 = pgest.log_prob(one, actions[position:position + 1], **kw)
        (lp1.sum() + 0.3 * ent1.sum()).backward()
    finally:
        torch.set_num_threads(previous)
    assert same_bits(lp1[0], lp_all[position]) and same_bits(ent1[0], ent_all[position])
    assert same_bits(one.grad[0], x_all.grad[position])
    assert same_bits(pgest.entropy(rows, **kw)[position], pgest.entropy(rows[position:position + 1], **kw)[0])


@SETTINGS
@given(K=st.sampled_from([2, 7, 33, 300, 4097]), batch=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from(FLOAT_DTYPES),
       truncate=st.sampled_from([None, dict(temperature=0.7, top_p=0.9), dict(top_k=3)]))
def test_the_draw_for_a_given_uniform_does_not_depend_on_the_batch(K, batch, data, dtype, truncate):
    position = data.draw(st.integers(0, batch - 1))
    rows, _ = one_and_in_batch(K, batch, position, dtype, seed=K + batch)
    u = torch.rand(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    trunc = None
    if truncate:
        from pgest.truncation import filters

        f = filters(rows.shape[:-1], **truncate)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rec = lambda n: (torch.empty(n, dtype=acc), torch.empty(n, dtype=torch.int64),  # noqa: E731
                         torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=acc))
        trunc = lambda n: (*f, rec(n))  # noqa: E731
    all_rows = sample_native(rows, 2, 0, uniforms=u, truncation=trunc(batch) if trunc else None)
    alone = sample_native(rows[position:position + 1].contiguous(), 2, 0, uniforms=u[position:position + 1].contiguous(),
                          truncation=trunc(1) if trunc else None)
    for a, b in zip(all_rows[:3], alone[:3]):
        assert same_bits(a[position], b[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sampling_token_by_token_equals_scoring_the_sequence(dtype):
    # generation draws one token per step (a batch of one row); training scores
    # the whole sequence in one call: 0 differing bits
    g = torch.Generator().manual_seed(5)
    seq = (torch.randn(24, 1000, generator=g) * 2).to(dtype)
    gen = torch.Generator().manual_seed(6)
    steps = [pgest.sample(seq[t:t + 1], generator=gen, temperature=0.8, top_p=0.95) for t in range(24)]
    actions = torch.cat([s.actions for s in steps])
    lp, ent = pgest.log_prob(seq, actions, temperature=0.8, top_p=0.95)
    assert torch.equal(torch.cat([s.log_prob for s in steps]), lp)
    assert torch.equal(torch.cat([s.entropy for s in steps]), ent)
    plain = [pgest.sample(seq[t:t + 1], generator=gen) for t in range(24)]
    lp2, _ = pgest.log_prob(seq, torch.cat([s.actions for s in plain]))
    assert torch.equal(torch.cat([s.log_prob for s in plain]), lp2)


# ---- the fused head ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("H", [8, 300, 2048])
def test_products_give_each_row_its_own_bits(dtype, H):
    # the platform property the head rests on (tiles.products, tiles.mm_rows):
    # for a given weight, a row's products are the same bits in any number
    # of rows, at any position, for 1 or 2 threads (the head keeps the
    # columns fixed: a product's width changes float64's bits); a torch
    # whose matmul breaks this fails here first
    from pgest.linear.tiles import mm_rows, products

    g = torch.Generator().manual_seed(H)
    h, w = torch.randn(40, H, generator=g).to(dtype), torch.randn(700, H, generator=g).to(dtype)
    ref = with_threads(2, lambda: products(h, w))
    ref_mm = with_threads(2, lambda: mm_rows(ref.to(dtype), w))
    for n, start, threads in [(1, 0, 1), (2, 5, 2), (3, 7, 1), (5, 1, 2), (9, 2, 2), (13, 20, 1), (40, 0, 1)]:
        x = with_threads(threads, lambda: products(h[start:start + n], w))
        assert same_bits(x, ref[start:start + n])
        y = with_threads(threads, lambda: mm_rows(ref[start:start + n].to(dtype), w))
        assert same_bits(y, ref_mm[start:start + n])


def head_inputs(V, H, batch, position, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2 / H ** 0.5)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    actions = torch.randint(0, V, (batch,), generator=g)
    if batch > 1:
        actions[(position + 1) % batch] = -100  # padding around it
    return hidden, weight, bias, actions


def with_threads(n, fn):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(previous)


TILES = st.sampled_from([(None, None), (3, 256), (8, 1000), (64, 4096), (5, 2048)])


@SETTINGS
@given(V=st.sampled_from([300, 5000]), H=st.sampled_from([8, 48, 300]), batch=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from(FLOAT_DTYPES), tiles=TILES, other_tiles=TILES, threads=st.sampled_from([1, 2]))
def test_linear_log_prob_of_a_token_alone_and_in_a_batch(V, H, batch, data, dtype, tiles, other_tiles, threads):
    # any batch, position, padding, token_tile / vocab_tile and thread count:
    # the token's log-prob, entropy and hidden-state gradient are the same bits
    position = data.draw(st.integers(0, batch - 1))
    hidden, weight, bias, actions = head_inputs(V, H, batch, position, dtype, seed=V + batch)

    def run(h, a, tn, tv):
        h = h.clone().requires_grad_()
        lp, ent = pgest.linear_log_prob(h, weight, a, bias=bias, token_tile=tn, vocab_tile=tv)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp, ent, h.grad

    lp_all, ent_all, g_all = with_threads(threads, lambda: run(hidden, actions, *tiles))
    lp1, ent1, g1 = with_threads(3 - threads, lambda: run(hidden[position:position + 1],
                                                         actions[position:position + 1], *other_tiles))
    assert same_bits(lp1[0], lp_all[position]) and same_bits(ent1[0], ent_all[position])
    assert same_bits(g1[0], g_all[position])


@devices()
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tiles", [(None, None), (4, 256), (16, 6144)])
def test_linear_sampling_token_by_token_equals_scoring_the_sequence(dtype, tiles, device):
    # the probe: generation draws one token per step through the fused
    # head, training scores the sequence in one call (other tiles, other
    # threads): 0 differing bits (on CUDA: cuBLAS with the same padded
    # products, never run yet)
    V, H, T = 5000, 48, 24
    hidden, weight, bias, _ = (t.to(device) for t in head_inputs(V, H, T, 0, dtype, seed=11))
    gen = torch.Generator().manual_seed(6)
    steps = [pgest.linear_sample(hidden[t:t + 1], weight, bias=bias, generator=gen) for t in range(T)]
    actions = torch.cat([s.actions for s in steps])
    lp, ent = with_threads(1, lambda: pgest.linear_log_prob(hidden, weight, actions, bias=bias, token_tile=tiles[0],
                                                            vocab_tile=tiles[1]))
    assert torch.equal(torch.cat([s.log_prob for s in steps]), lp)
    assert torch.equal(torch.cat([s.entropy for s in steps]), ent)
    # and a draw does not depend on the batch it is drawn in: the batch's draws,
    # scored one token at a time
    batch = pgest.linear_sample(hidden, weight, bias=bias, generator=torch.Generator().manual_seed(7),
                                token_tile=tiles[0], vocab_tile=tiles[1])
    alone = [pgest.linear_log_prob(hidden[t:t + 1], weight, batch.actions[t:t + 1], bias=bias) for t in range(T)]
    assert torch.equal(torch.cat([a.log_prob for a in alone]), batch.log_prob)
    # the truncated head too
    kw = dict(temperature=0.8, top_p=0.9)
    steps = [pgest.linear_sample(hidden[t:t + 1], weight, bias=bias, generator=gen, **kw) for t in range(T)]
    lp, ent = pgest.linear_log_prob(hidden, weight, torch.cat([s.actions for s in steps]), bias=bias,
                                    token_tile=tiles[0], vocab_tile=tiles[1], **kw)
    assert torch.equal(torch.cat([s.log_prob for s in steps]), lp)
    assert torch.equal(torch.cat([s.entropy for s in steps]), ent)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_truncated_head_gradient_of_a_token_alone_and_in_a_batch(dtype):
    # the truncated route's blocks of tokens: log-prob, entropy and the hidden
    # state's gradient of a token alone and inside batches of 13 and 37
    V, H = 5000, 48
    kw = dict(temperature=0.8, top_p=0.9)
    for N, t in ((13, 5), (37, 36)):
        hidden, weight, bias, _ = head_inputs(V, H, N, t, dtype, seed=N)
        actions = pgest.linear_sample(hidden, weight, bias=bias, generator=torch.Generator().manual_seed(2),
                                      **kw).actions

        def run(h, a):
            h = h.clone().requires_grad_()
            lp, ent = pgest.linear_log_prob(h, weight, a, bias=bias, **kw)
            (lp.sum() + 0.3 * ent.sum()).backward()
            return lp, ent, h.grad

        lp_all, ent_all, g_all = with_threads(2, lambda: run(hidden, actions))
        lp1, ent1, g1 = with_threads(1, lambda: run(hidden[t:t + 1], actions[t:t + 1]))
        assert same_bits(lp1[0], lp_all[t]) and same_bits(ent1[0], ent_all[t]) and same_bits(g1[0], g_all[t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_policy_loss_gradient_of_a_token_alone_and_in_a_batch(dtype):
    # with reduction="sum" a token's share of the loss and its hidden-state
    # gradient are its own; the weight's gradient sums over tokens (it may
    # depend on the batch: not compared)
    V, H, N = 5000, 48, 13
    hidden, weight, bias, actions = head_inputs(V, H, N, 4, dtype, seed=3)
    adv = torch.randn(N, generator=torch.Generator().manual_seed(4))

    def run(h, a, ad, tn):
        h = h.clone().requires_grad_()
        loss = pgest.linear_policy_loss(h, weight, a, ad, bias=bias, entropy_weight=0.01, reduction="sum",
                                        token_tile=tn)
        loss.backward()
        return h.grad

    g_all = with_threads(2, lambda: run(hidden, actions, adv, None))
    for t in (0, 4, 12):
        g1 = with_threads(1, lambda: run(hidden[t:t + 1], actions[t:t + 1], adv[t:t + 1], 3))
        assert same_bits(g1[0], g_all[t])
