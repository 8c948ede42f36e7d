"""A token's numbers on logits do not depend on the batch: one row alone and
the same row at any position of a batch (with padding rows around it), for 1
or 2 threads, in every float dtype, give the same bits: log-prob, entropy,
their gradient, the draw for a given uniform, and the truncated versions.
(The fused head's products and its vocabulary tiles are not covered: see the
LLM guide.)"""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgest
from pgest.ops.sample import sample_native

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
