"""The randomness contract: Philox4x32-10 known answers, an independent
implementation of the uniform mapping, and reproducibility through torch's
generators."""
import pytest
import torch

import pgest

# Known-answer vectors published with Random123 (counter, key -> output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert pgest.philox.philox4x32_10(counter, key) == expected


def _philox_py(ctr, key):
    """Philox4x32-10 from the paper, in Python integers."""
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
    return c


def test_uniforms_match_an_independent_implementation():
    seed, offset = 0x1234_5678_9ABC_DEF0, 7
    u = pgest.philox.uniforms(5, 5, seed, offset)
    for row in range(5):
        for s in range(5):
            c = offset + s // 2
            out = _philox_py((row, 0, c & 0xFFFFFFFF, c >> 32), (seed & 0xFFFFFFFF, seed >> 32))
            a, b = (out[2], out[3]) if s % 2 else (out[0], out[1])
            expected = ((a >> 5) * 2**26 + (b >> 6)) / 2**53
            assert u[row, s].item() == expected


def test_uniforms_are_uniform():
    u = pgest.philox.uniforms(1000, 100, seed=3)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    # mean and variance of 1e5 uniforms: 1/2 +- 5 sigma, 1/12 +- 5 sigma
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    # neighbouring rows and samples are not correlated
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].item()) < 0.02


def test_manual_seed_reproduces_and_calls_differ():
    x = torch.randn(64, 50)
    labels = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(11)
    a = pgest.reinforce_grad(x, labels).actions
    b = pgest.reinforce_grad(x, labels).actions
    torch.manual_seed(11)
    c = pgest.reinforce_grad(x, labels).actions
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_generator_is_advanced_like_a_random_op():
    g = torch.Generator().manual_seed(5)
    pgest.reinforce_grad(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), generator=g)
    h = torch.Generator().manual_seed(5)
    torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=h)
    assert torch.equal(g.get_state(), h.get_state())


def test_generator_errors():
    x, lab = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="generator"):
        pgest.reinforce_grad(x, lab, generator=123)


def test_uniforms_arguments():
    # a negative int64 seed (as a seed tensor holds) is the same 64-bit key
    assert torch.equal(pgest.philox.uniforms(2, 3, seed=-1), pgest.philox.uniforms(2, 3, seed=2**64 - 1))
    for kw, exc, match in [
        (dict(seed=2**64), ValueError, "seed must be in"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=1, offset=-1), ValueError, "offset must be in"),
    ]:
        with pytest.raises(exc, match=match):
            pgest.philox.uniforms(2, 3, **kw)
    with pytest.raises(ValueError, match="rows must be in"):
        pgest.philox.uniforms(-1, 3, seed=0)


def test_every_sampling_op_takes_one_seed_per_call_even_on_an_empty_batch():
    # ops the README says draw alike must stay alike after an empty call:
    # each call advances the generator by one draw, whatever the batch size
    import pgest as pg

    def calls(n):
        x = torch.randn(n, 5)
        h, w = torch.randn(n, 3), torch.randn(5, 3)
        lab = torch.zeros(n, dtype=torch.int64)
        return {
            "sample": lambda g: pg.sample(x, generator=g),
            "reinforce": lambda g: pg.reinforce(x, lab, generator=g),
            "reinforce_grad": lambda g: pg.reinforce_grad(x.log_softmax(-1), lab, generator=g),
            "linear_sample": lambda g: pg.linear_sample(h, w, generator=g),
            "Categorical.sample": lambda g: pg.Categorical(logits=x).sample(generator=g),
        }

    reference = torch.Generator().manual_seed(5)
    reference.manual_seed(5)
    pg.sample(torch.randn(1, 5), generator=reference)
    advanced = reference.get_state()
    for n in (0, 3):
        for name, call in calls(n).items():
            g = torch.Generator().manual_seed(5)
            call(g)
            assert torch.equal(g.get_state(), advanced), (name, n)
