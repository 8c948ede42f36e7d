import math

import pytest
import torch
from helpers import devices, on_each_device
from scipy import stats
from torch.distributions import Categorical as TorchCategorical

import pgest


@devices()
def test_same_log_prob_entropy_and_gradients_as_torch(device):
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64).to(device).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    a = torch.randint(0, 6, (32,)).to(device)
    ours, theirs = pgest.Categorical(logits=x), TorchCategorical(logits=xt)
    lp, ent = ours.log_prob(a), ours.entropy()
    lpt, entt = theirs.log_prob(a), theirs.entropy()
    torch.testing.assert_close(lp, lpt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, entt, rtol=1e-12, atol=1e-12)
    w = torch.randn(32, dtype=torch.float64).to(device)
    ((lp * w).sum() - 0.01 * ent.sum()).backward()
    ((lpt * w).sum() - 0.01 * entt.sum()).backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ours.probs, theirs.probs)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert torch.equal(ours.mode, theirs.mode)
    assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape


@on_each_device
def test_log_prob_then_entropy_share_one_backward_node():
    x = torch.randn(8, 5, requires_grad=True)
    d = pgest.Categorical(logits=x)
    lp = d.log_prob(torch.zeros(8, dtype=torch.long))
    ent = d.entropy()
    assert lp.grad_fn.next_functions[0][0] is ent.grad_fn.next_functions[0][0]


@on_each_device
def test_construction_materialises_nothing():
    x = torch.randn(64, 1000)
    d = pgest.Categorical(logits=x)
    assert d._x is x and d._norm_probs is None and d._norm_logits is None
    assert "logits" not in d.__dict__ and "probs" not in d.__dict__  # torch's lazy_property caches stay unbuilt


def test_sample_shapes_and_log_prob_broadcast():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 7)
    d, t = pgest.Categorical(logits=x), TorchCategorical(logits=x)
    assert d.sample().shape == (4, 3)
    s = d.sample((5,))
    assert s.shape == (5, 4, 3) and s.dtype == torch.int64
    torch.testing.assert_close(d.log_prob(s), t.log_prob(s))
    assert d.sample(num_samples=2).shape == (4, 3, 2)
    v = torch.tensor(2)
    torch.testing.assert_close(d.log_prob(v), t.log_prob(v))
    g = torch.Generator().manual_seed(3)
    s1 = d.sample(generator=g)
    g.manual_seed(3)
    assert torch.equal(s1, d.sample(generator=g))


def test_sample_frequencies_chi_square():
    torch.manual_seed(2)
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    n = 40000
    d = pgest.Categorical(logits=logits.expand(n, 5))
    counts = torch.bincount(d.sample(), minlength=5).double()
    p = torch.softmax(logits.double(), 0)
    _, pvalue = stats.chisquare(counts.numpy(), (p * n).numpy())
    assert pvalue > 1e-4


@on_each_device
def test_probs_constructor_matches_torch():
    p = torch.tensor([[0.2, 0.0, 0.8], [1.0, 1.0, 2.0]])
    d, t = pgest.Categorical(probs=p), TorchCategorical(probs=p)
    a = torch.tensor([2, 1])
    torch.testing.assert_close(d.log_prob(a), t.log_prob(a))
    torch.testing.assert_close(d.entropy(), t.entropy())
    torch.testing.assert_close(d.probs, t.probs)
    with pytest.raises(ValueError, match="non-negative"):
        pgest.Categorical(probs=torch.tensor([[0.5, -0.1]]))
    with pytest.raises(ValueError, match="must be specified"):
        pgest.Categorical()


@on_each_device
def test_out_of_range_action_raises():
    d = pgest.Categorical(logits=torch.randn(3, 4))
    with pytest.raises(IndexError, match="out of range"):
        d.log_prob(torch.tensor([0, 4, 1]))
    with pytest.raises(IndexError, match="out of range"):
        d.log_prob(torch.tensor([0, -100, 1]))  # no ignore_index here, as torch


def _agent_update(cat_cls, seed):
    """One PPO-style minibatch update of a small actor written as CleanRL
    writes it; the actions are given so both classes see the same data."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    obs = torch.randn(64, 4, dtype=torch.float64)
    actions = torch.randint(0, 3, (64,))
    old_lp = torch.log_softmax(net(obs), -1).gather(1, actions[:, None]).squeeze(1).detach() + 0.05
    adv = torch.randn(64, dtype=torch.float64)
    dist = cat_cls(logits=net(obs))
    lp, ent = dist.log_prob(actions), dist.entropy()
    ratio = (lp - old_lp).exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean() - 0.01 * ent.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_agent_update_is_the_same_as_with_torchs_class():
    for seed in range(3):
        for p, q in zip(_agent_update(pgest.Categorical, seed), _agent_update(TorchCategorical, seed)):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@on_each_device
def test_a_rollout_under_inference_mode():
    # inference tensors have no version counter, which the reuse of a draw's
    # statistics is keyed on: inside inference mode, or on logits made there,
    # the draw is not reused, and nothing fails
    x = torch.randn(5, 7)
    ref = TorchCategorical(logits=x)
    with torch.inference_mode():
        d = pgest.Categorical(logits=x * 1)
        a = d.sample()
        lp, ent = d.log_prob(a), d.entropy()
    torch.testing.assert_close(lp, ref.log_prob(a))
    torch.testing.assert_close(ent, ref.entropy())
    with torch.inference_mode():
        xi = x * 1
    d = pgest.Categorical(logits=xi)
    a = d.sample()
    torch.testing.assert_close(d.log_prob(a), ref.log_prob(a))


@on_each_device
def test_log_prob_after_sample_reuses_the_draw_and_agrees():
    # sample() keeps (max, log Z, H) of the rows; log_prob then reads only the
    # chosen entries. Same values and gradients as a fresh object's, and a
    # change of the logits in between makes it read them again.
    torch.manual_seed(0)
    x = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    d = pgest.Categorical(logits=x)
    a = d.sample()
    lp, ent = d.log_prob(a), d.entropy()
    fresh = pgest.Categorical(logits=x)
    lp2, ent2 = fresh.log_prob(a), fresh.entropy()
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
    w = torch.randn(50, dtype=torch.float64)
    g1, = torch.autograd.grad((lp * w).sum() + ent.sum(), x)
    g2, = torch.autograd.grad((lp2 * w).sum() + ent2.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-13)
    ref = x.detach().log_softmax(-1).gather(1, a.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(lp.detach(), ref, rtol=1e-12, atol=1e-12)

    y = torch.randn(50, 7, dtype=torch.float64)
    d = pgest.Categorical(logits=y)
    a = d.sample()
    with torch.no_grad():
        y.mul_(3.0)  # in place: the draw's statistics no longer hold
    torch.testing.assert_close(d.log_prob(a), y.log_softmax(-1).gather(1, a.view(-1, 1)).squeeze(1))
    with pytest.raises(IndexError, match="out of range"):
        d = pgest.Categorical(logits=y)
        d.sample()
        d.log_prob(torch.full((50,), 7))


@on_each_device
def test_log_prob_of_the_drawn_actions_twice_and_after_in_place_changes():
    # log_prob(a) of the very tensor sample() returned takes the draw's own
    # log-probs (no forward pass) once; a second call, or other actions, go
    # through the kernels. All must agree with log_softmax, with gradients.
    torch.manual_seed(1)
    x = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    d = pgest.Categorical(logits=x)
    a = d.sample()
    lp1 = d.log_prob(a)
    ent1 = d.entropy()
    lp2 = d.log_prob(a)
    ref = x.log_softmax(-1).gather(1, a.view(-1, 1)).squeeze(1)
    assert torch.equal(lp1, lp2)
    torch.testing.assert_close(lp1, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(40, dtype=torch.float64)
    for lp in (lp1, lp2):
        g, = torch.autograd.grad((lp * w).sum() + 0.5 * ent1.sum(), x, retain_graph=True)
        y = x.detach().clone().requires_grad_()
        ls = y.log_softmax(-1)
        ((ls.gather(1, a.view(-1, 1)).squeeze(1) * w).sum() - 0.5 * (ls.exp() * ls).sum()).backward()
        torch.testing.assert_close(g, y.grad, rtol=1e-12, atol=1e-13)

    # actions changed in place before log_prob: not the draw's any more
    d = pgest.Categorical(logits=x)
    a = d.sample()
    a.fill_(3)
    torch.testing.assert_close(d.log_prob(a), x.log_softmax(-1)[:, 3], rtol=1e-12, atol=1e-12)

    # actions changed in place between forward and backward: caught
    d = pgest.Categorical(logits=x)
    a = d.sample()
    lp = d.log_prob(a)
    a.add_(1).remainder_(5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()

    # without grad the draw's log-probs come back as they are
    with torch.no_grad():
        d = pgest.Categorical(logits=x)
        a = d.sample()
        torch.testing.assert_close(d.log_prob(a), x.log_softmax(-1).gather(1, a.view(-1, 1)).squeeze(1),
                                   rtol=1e-12, atol=1e-12)


def test_a_step_compiles_with_fullgraph_and_matches_eager():
    # sample() -> log_prob(a) -> entropy() under torch.compile(fullgraph=True):
    # the draw-reuse paths (keyed on tensor versions) stay out of the graph.
    def step(x):
        d = pgest.Categorical(logits=x)
        a = d.sample()
        return (d.log_prob(a) * torch.arange(x.shape[0], dtype=x.dtype)).sum() + 0.1 * d.entropy().sum(), a

    x = torch.randn(24, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    loss, a = step(x)
    g, = torch.autograd.grad(loss, x)
    torch.manual_seed(3)
    loss_c, a_c = torch.compile(step, fullgraph=True)(x)
    g_c, = torch.autograd.grad(loss_c, x)
    assert torch.equal(a, a_c)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_c, g, rtol=1e-12, atol=1e-12)


@on_each_device
def test_log_prob_errors_name_value_and_the_callers_indices():
    d = pgest.Categorical(logits=torch.randn(2, 3, 7))
    bad = torch.zeros(2, 3, dtype=torch.int64)
    bad[1, 2] = 7
    with pytest.raises(IndexError, match=r"^value\[1, 2\] = 7 is out of range for 7 actions$"):
        d.log_prob(bad)
    x = torch.randn(2, 3, 7)
    x[1, 0, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^logits\[1, 0, 4\] is nan"):
        pgest.Categorical(logits=x).log_prob(torch.zeros(2, 3, dtype=torch.int64))


# ---- a real torch.distributions.Categorical -------------------------------------

def test_is_a_torch_categorical_with_torchs_attributes():
    from torch.distributions import Distribution, constraints

    x = torch.randn(2, 3)
    d = pgest.Categorical(logits=x)
    assert isinstance(d, TorchCategorical) and isinstance(d, Distribution)
    assert repr(d) == "Categorical(logits: torch.Size([2, 3]))"
    assert repr(pgest.Categorical(probs=torch.ones(3))) == "Categorical(probs: torch.Size([3]))"
    assert d.arg_constraints == TorchCategorical.arg_constraints
    assert d.support.check(torch.tensor([0, 2, 3, -1])).tolist() == [True, True, False, False]
    assert constraints.is_dependent(type(d).support) is True
    assert d.batch_shape == (2,) and d.event_shape == () and d.param_shape == (2, 3)
    for meth in ("cdf", "icdf"):
        with pytest.raises(NotImplementedError):
            getattr(d, meth)(torch.zeros(2))
    with pytest.raises(NotImplementedError):
        d.rsample()
    assert d.deterministic_sample.tolist() == x.argmax(-1).tolist()
    e = d.expand((4, 2))
    assert isinstance(e, pgest.Categorical) and e.batch_shape == (4, 2)
    torch.testing.assert_close(e.log_prob(torch.ones(4, 2, dtype=torch.long)),
                               TorchCategorical(logits=x).expand((4, 2)).log_prob(torch.ones(4, 2, dtype=torch.long)))
    with pytest.raises(ValueError):
        d.log_prob(torch.zeros(3, dtype=torch.long))  # (3,) does not broadcast against (2,)


@on_each_device
def test_float_actions_as_stable_baselines3_hands_them():
    x = torch.randn(5, 4, requires_grad=True)
    a = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0])  # a float buffer of whole numbers
    d, t = pgest.Categorical(logits=x), TorchCategorical(logits=x)
    torch.testing.assert_close(d.log_prob(a), t.log_prob(a))
    torch.testing.assert_close(d.log_prob(a[None].expand(3, 5)), t.log_prob(a[None].expand(3, 5)))
    with pytest.raises(ValueError, match="whole numbers"):
        d.log_prob(torch.tensor([0.5, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="out of range"):  # torch's validated class raises ValueError too
        d.log_prob(torch.tensor([0, 1, 7, 1, 1]))


@on_each_device
def test_probs_with_exact_zeros_give_finite_gradients():
    # action masking by a zero probability: torch's gradients are finite, and
    # so are pgest's (they were NaN for the whole row); live entries agree
    p = torch.tensor([[0.2, 0.0, 0.8], [0.5, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    pt = p.detach().clone().requires_grad_()
    a = torch.tensor([2, 0])
    d, t = pgest.Categorical(probs=p), TorchCategorical(probs=pt)
    (d.log_prob(a).sum() + d.entropy().sum()).backward()
    (t.log_prob(a).sum() + t.entropy().sum()).backward()
    assert torch.isfinite(p.grad).all()
    live = p.detach() > 0
    torch.testing.assert_close(p.grad[live], pt.grad[live], rtol=1e-6, atol=1e-9)
    assert (p.grad[~live] == 0).all()  # a masked entry's gradient is 0, as for a -inf logit
    s = pgest.Categorical(probs=p.detach()).sample((2000,))
    assert not (s == torch.tensor([1, 2])).any()  # never drawn


@on_each_device
def test_kl_divergence_registered_both_ways_and_with_masks():
    from torch.distributions import kl_divergence

    torch.manual_seed(0)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    want = kl_divergence(TorchCategorical(logits=x), TorchCategorical(logits=y))
    for p, q in ((pgest.Categorical(logits=x), pgest.Categorical(logits=y)),
                 (pgest.Categorical(logits=x), TorchCategorical(logits=y)),
                 (TorchCategorical(logits=x), pgest.Categorical(logits=y))):
        torch.testing.assert_close(kl_divergence(p, q), want)
    # closed form on a hand case with masked actions: p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2)
    p = pgest.Categorical(probs=torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    q = pgest.Categorical(probs=torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert abs(kl_divergence(p, q).item() - math.log(2)) < 1e-12
    assert kl_divergence(q, p).item() == math.inf


@on_each_device
def test_mixture_same_family_takes_it():
    from torch.distributions import MixtureSameFamily, Normal

    torch.manual_seed(1)
    w = torch.randn(3, 4)
    mix = MixtureSameFamily(pgest.Categorical(logits=w), Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5))
    ref = MixtureSameFamily(TorchCategorical(logits=w), Normal(mix.component_distribution.loc,
                                                               mix.component_distribution.scale))
    v = torch.randn(5, 3)
    torch.testing.assert_close(mix.log_prob(v), ref.log_prob(v))
    assert mix.sample((7,)).shape == (7, 3)


@on_each_device
def test_validate_args_checks_parameters_at_construction():
    with pytest.raises(ValueError):
        pgest.Categorical(logits=torch.tensor([0.0, float("nan")]), validate_args=True)
    with pytest.raises(ValueError):
        pgest.Categorical(probs=torch.tensor([0.0, 0.0]), validate_args=True)
    with pytest.raises(ValueError):
        pgest.Categorical(probs=torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="one-dimensional"):
        pgest.Categorical(logits=torch.tensor(1.0))
    assert pgest.Categorical(logits=torch.zeros(3), validate_args=False)._validate_args is False


def test_torchrl_probabilistic_actor_takes_it():
    pytest.importorskip("torchrl")
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import ExplorationType, set_exploration_type
    from torchrl.modules import ProbabilisticActor

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["obs"], out_keys=["logits"]), in_keys=["logits"],
                               distribution_class=pgest.Categorical, return_log_prob=True)
    td = TensorDict({"obs": torch.randn(64, 4)}, batch_size=[64])
    with set_exploration_type(ExplorationType.RANDOM):
        out = actor(td.clone())
    want = TorchCategorical(logits=net(td["obs"])).log_prob(out["action"])
    torch.testing.assert_close(out["action_log_prob"], want)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert torch.equal(actor(td.clone())["action"], net(td["obs"]).argmax(-1))
    dist = actor.get_dist(td)
    assert isinstance(dist, pgest.Categorical)
    torch.testing.assert_close(dist.log_prob(out["action"].float()), want)


def test_stable_baselines3_ppo_on_multidiscrete_actions(monkeypatch):
    # SB3 hands float actions from its rollout buffer to Categorical.log_prob
    # and asserts its distributions are torch Distributions
    pytest.importorskip("stable_baselines3")
    import gymnasium as gym
    import numpy as np
    import stable_baselines3.common.distributions as sb3_dist
    from stable_baselines3 import A2C, PPO

    class Env(gym.Env):
        observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        action_space = gym.spaces.MultiDiscrete([3, 4])

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.observation_space.sample(), {}

        def step(self, action):
            self.t += 1
            return self.observation_space.sample(), float(action[0] == 1) + float(action[1] == 2), self.t >= 16, \
                False, {}

    monkeypatch.setattr(sb3_dist, "Categorical", pgest.Categorical)
    for algo in (PPO, A2C):
        kw = dict(n_steps=32, batch_size=32, n_epochs=2) if algo is PPO else dict(n_steps=8)
        model = algo("MlpPolicy", Env(), seed=0, device="cpu", **kw)
        model.learn(64)
        dist = model.policy.get_distribution(torch.zeros(2, 3))
        assert all(isinstance(d, pgest.Categorical) for d in dist.distribution)
        acts = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # floats, as from the buffer
        assert torch.isfinite(dist.log_prob(acts)).all()


# torch's Categorical examples (test_distributions.py registers these three
# parameter sets for its generic tests): every method against torch's class
EXAMPLES = [
    {"probs": torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)},
    {"probs": torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)},
    {"logits": torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)},
    {"probs": torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)},  # 1-D: batch ()
]


@pytest.mark.parametrize("params", EXAMPLES, ids=["probs", "one-hot probs", "logits", "1-d probs"])
@on_each_device
def test_conformance_with_torch_on_its_examples(params):
    d, t = pgest.Categorical(**params), TorchCategorical(**params)
    assert d.batch_shape == t.batch_shape and d.event_shape == t.event_shape and d.param_shape == t.param_shape
    assert torch.isnan(d.mean).all() and torch.isnan(d.variance).all() and d.mean.shape == t.mean.shape
    torch.testing.assert_close(d.probs, t.probs)
    torch.testing.assert_close(d.mode, t.mode)
    for shape in [(), (1,), (2, 2), (6,), (3, 4)]:
        s = d.sample(shape)
        assert s.shape == t.sample(shape).shape and not s.requires_grad and s.dtype == torch.int64
        assert d.support.check(s).all()
        assert (t.probs.expand(s.shape + t.probs.shape[-1:]).gather(-1, s[..., None]) > 0).all()  # never p = 0
    values = d.enumerate_support()
    torch.testing.assert_close(values, t.enumerate_support())
    torch.testing.assert_close(d.enumerate_support(expand=False), t.enumerate_support(expand=False))
    # a zero probability: -inf here, log(eps) in torch's (it clamps); the rest agrees
    live = t.probs.expand(values.shape + t.probs.shape[-1:]).gather(-1, values[..., None]).squeeze(-1) > 0
    torch.testing.assert_close(d.log_prob(values)[live], t.log_prob(values)[live])
    assert (d.log_prob(values)[~live] == -math.inf).all()
    torch.testing.assert_close(d.entropy(), t.entropy())
    torch.testing.assert_close(d.perplexity(), t.perplexity())
    # log_prob of values broadcast with torch's rules: (n, 1) against a batch of (2,)
    v = torch.tensor([[0], [1]])
    if d.batch_shape:
        ok = d.log_prob(v) > -math.inf
        torch.testing.assert_close(d.log_prob(v)[ok], t.log_prob(v)[ok])
    e, te = d.expand((3,) + d.batch_shape), t.expand((3,) + t.batch_shape)
    assert e.batch_shape == te.batch_shape and e.sample().shape == te.sample().shape
    assert torch.distributions.kl_divergence(d, t).shape == d.batch_shape
    x = next(iter(params.values()))
    if torch.all(x > 0):
        s = d.sample()
        assert torch.autograd.gradcheck(lambda p: pgest.Categorical(**{next(iter(params)): p}).log_prob(s),
                                        (x,), check_batched_grad=True)


@on_each_device
def test_invalid_examples_raise_value_errors_with_validation():
    # torch's bad Categorical examples: negative probabilities; a row of zeros
    for bad in (torch.tensor([[-1.0, 10.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])):
        with pytest.raises(ValueError):
            TorchCategorical(probs=bad, validate_args=True)
        with pytest.raises(ValueError):
            pgest.Categorical(probs=bad, validate_args=True)
    with pytest.raises(ValueError):  # a value outside the support, validated as torch does
        pgest.Categorical(logits=torch.zeros(2, 3), validate_args=True).log_prob(torch.tensor([0, 3]))
