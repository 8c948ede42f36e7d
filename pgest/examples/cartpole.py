"""CartPole-v1 trained through pgest, two ways.

``--algo reinforce`` (default): REINFORCE with rewards-to-go through GAE, a
value-head baseline, and the policy trained through pgest.

Each update collects a batch of whole episodes from several environments at
once, samples actions with ``pgest.sample``, computes advantages with
``pgest.gae`` (time-major, ``dones`` cutting episodes apart), normalises them,
and trains the policy with ``pgest.policy_loss`` (padding steps after an
episode ended are ``ignore_index``) and the value head with a squared error.

``--algo ppo``: PPO with the clipped objective (CleanRL's CartPole settings:
4 environments, 128-step rollouts, 4 epochs of 4 minibatches, clip 0.2,
entropy 0.01, value 0.5, gradient norm 0.5, learning rate 2.5e-4 annealed).
``--dist pgest`` runs it on ``pgest.Categorical`` + ``pgest.gae`` +
``pgest.objectives.ppo_loss``; ``--dist torch`` runs the same algorithm
written with ``torch.distributions.Categorical``, a Python GAE loop and the
clipped loss in plain PyTorch, as CleanRL writes it.

Solved means the mean return of the last 100 episodes reaches 475.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import pgest
from pgest.examples import require

SOLVED_AT = 475.0


def _mlp(inp: int, out: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(inp, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, out))


def run(seed: int = 0, max_episodes: int = 1000, envs: int = 4, gamma: float = 0.99, lam: float = 0.95,
        lr: float = 1e-2, hidden: int = 64, entropy_weight: float = 0.0, progress: bool = False,
        stop_when_solved: bool = True) -> Dict:
    gym = require("gymnasium")
    torch.manual_seed(seed)
    policy, value = _mlp(4, 2, hidden), _mlp(4, 1, hidden)
    opt = torch.optim.Adam(list(policy.parameters()) + list(value.parameters()), lr=lr)
    world = [gym.make("CartPole-v1") for _ in range(envs)]
    gen = torch.Generator().manual_seed(seed)
    returns: List[float] = []
    solved_at: Optional[int] = None
    bar = require("tqdm").tqdm(total=max_episodes, desc=f"cartpole seed {seed}", unit="ep") if progress else None
    t0 = time.perf_counter()
    batch = 0
    while len(returns) < max_episodes:
        # -- collect one whole episode per environment ---------------------------
        obs = torch.stack([torch.as_tensor(e.reset(seed=seed * 100003 + batch * envs + i)[0], dtype=torch.float32)
                           for i, e in enumerate(world)])
        batch += 1
        alive = torch.ones(envs, dtype=torch.bool)
        ep_return = torch.zeros(envs)
        steps_obs, steps_act, steps_rew, steps_done, steps_alive = [], [], [], [], []
        while alive.any():
            with torch.no_grad():
                actions = pgest.sample(policy(obs), generator=gen).actions
            rew = torch.zeros(envs)
            done = torch.ones(envs, dtype=torch.bool)
            nxt = obs.clone()
            for i in torch.nonzero(alive).flatten().tolist():
                o, r, terminated, truncated, _ = world[i].step(int(actions[i]))
                nxt[i] = torch.as_tensor(o, dtype=torch.float32)
                rew[i] = r
                done[i] = terminated or truncated
            steps_obs.append(obs)
            steps_act.append(torch.where(alive, actions, torch.full_like(actions, -100)))
            steps_rew.append(rew)
            steps_done.append(done)
            steps_alive.append(alive.clone())
            ep_return += rew
            alive &= ~done
            obs = nxt
        for r in ep_return.tolist():
            if len(returns) < max_episodes:
                returns.append(r)
                if solved_at is None and len(returns) >= 100 and sum(returns[-100:]) / 100 >= SOLVED_AT:
                    solved_at = len(returns)
        if bar is not None:
            bar.update(envs)
            bar.set_postfix(mean100=f"{sum(returns[-100:]) / min(len(returns), 100):.0f}")
        if solved_at is not None and stop_when_solved:
            break

        # -- update: GAE advantages, policy loss with padding ignored ----------------
        O = torch.stack(steps_obs)                 # (T, B, 4)
        A = torch.stack(steps_act)                 # (T, B), -100 after the episode ended
        R = torch.stack(steps_rew)                 # (T, B)
        D = torch.stack(steps_done)                # (T, B)
        M = torch.stack(steps_alive)               # (T, B) real steps
        V = value(O).squeeze(-1)
        adv, ret = pgest.gae(R, V.detach(), D, gamma, lam)
        adv = (adv - adv[M].mean()) / (adv[M].std() + 1e-8)
        loss = pgest.policy_loss(policy(O), A, adv, entropy_weight=entropy_weight)
        loss = loss + 0.5 * F.mse_loss(V[M], ret[M])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if bar is not None:
        bar.close()
    for e in world:
        e.close()
    return {"seed": seed, "episodes_to_solve": solved_at, "episodes": len(returns),
            "returns": returns, "seconds": time.perf_counter() - t0}


class _ActorCritic(torch.nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.actor, self.critic = _mlp(4, 2, hidden), _mlp(4, 1, hidden)


def _torch_gae(rewards, values, dones, last_value, gamma, lam):
    """CleanRL's loop, for the plain-PyTorch variant."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        nonterminal = 1.0 - dones[t].float()
        next_v = last_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


def run_ppo(seed: int = 0, dist: str = "pgest", max_episodes: int = 1000, envs: int = 4, steps: int = 128,
            epochs: int = 4, minibatches: int = 4, gamma: float = 0.99, lam: float = 0.95, lr: float = 2.5e-4,
            clip: float = 0.2, entropy_coef: float = 0.01, value_coef: float = 0.5, max_grad_norm: float = 0.5,
            total_steps: int = 500_000, progress: bool = False, stop_when_solved: bool = True) -> Dict:
    """PPO on CartPole-v1; ``dist`` picks pgest's or torch's Categorical (and
    the matching GAE and loss). Returns episodes to solve, returns, seconds."""
    if dist not in ("pgest", "torch"):
        raise ValueError(f"dist must be 'pgest' or 'torch', got {dist!r}")
    gym = require("gymnasium")
    torch.manual_seed(seed)
    net = _ActorCritic()
    opt = torch.optim.Adam(net.parameters(), lr=lr, eps=1e-5)
    world = [gym.make("CartPole-v1") for _ in range(envs)]
    gen = torch.Generator().manual_seed(seed)
    Dist = pgest.Categorical if dist == "pgest" else torch.distributions.Categorical
    obs = torch.stack([torch.as_tensor(e.reset(seed=seed * 1000 + i)[0], dtype=torch.float32)
                       for i, e in enumerate(world)])
    ep_return = [0.0] * envs
    returns: List[float] = []
    solved_at: Optional[int] = None
    updates = max(1, total_steps // (envs * steps))
    bar = require("tqdm").tqdm(total=max_episodes, desc=f"ppo/{dist} seed {seed}", unit="ep") if progress else None
    t0 = time.perf_counter()
    for update in range(updates):
        for group in opt.param_groups:  # linear annealing, as CleanRL
            group["lr"] = lr * (1.0 - update / updates)
        O = torch.empty(steps, envs, 4)
        A = torch.empty(steps, envs, dtype=torch.long)
        LP = torch.empty(steps, envs)
        R = torch.empty(steps, envs)
        D = torch.empty(steps, envs, dtype=torch.bool)
        V = torch.empty(steps, envs)
        for t in range(steps):
            with torch.no_grad():
                d = Dist(logits=net.actor(obs))
                a = d.sample(generator=gen) if dist == "pgest" else d.sample()
                O[t], A[t], LP[t], V[t] = obs, a, d.log_prob(a), net.critic(obs).squeeze(-1)
            nxt = obs.clone()
            for i, e in enumerate(world):
                o, r, terminated, truncated, _ = e.step(int(a[i]))
                R[t, i], D[t, i] = r, terminated or truncated
                ep_return[i] += r
                if terminated or truncated:
                    if len(returns) < max_episodes:
                        returns.append(ep_return[i])
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(mean100=f"{sum(returns[-100:]) / min(len(returns), 100):.0f}")
                        if solved_at is None and len(returns) >= 100 and sum(returns[-100:]) / 100 >= SOLVED_AT:
                            solved_at = len(returns)
                    ep_return[i] = 0.0
                    o, _ = e.reset()
                nxt[i] = torch.as_tensor(o, dtype=torch.float32)
            obs = nxt
        if (solved_at is not None and stop_when_solved) or len(returns) >= max_episodes:
            break
        with torch.no_grad():
            last_v = net.critic(obs).squeeze(-1)
        if dist == "pgest":
            adv, ret = pgest.gae(R, V, D, gamma, lam, last_v)
        else:
            adv, ret = _torch_gae(R, V, D, last_v, gamma, lam)
        n = steps * envs
        O, A, LP, adv, ret = O.view(n, 4), A.view(n), LP.view(n), adv.view(n), ret.view(n)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for idx in perm.view(minibatches, -1):
                mb_adv = adv[idx]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                d = Dist(logits=net.actor(O[idx]))
                new_lp, entropy = d.log_prob(A[idx]), d.entropy()
                if dist == "pgest":
                    pg_loss, _ = pgest.objectives.ppo_loss(new_lp, LP[idx], mb_adv, clip=clip)
                else:
                    ratio = (new_lp - LP[idx]).exp()
                    pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                v_loss = 0.5 * (net.critic(O[idx]).squeeze(-1) - ret[idx]).pow(2).mean()
                loss = pg_loss - entropy_coef * entropy.mean() + value_coef * v_loss
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
                opt.step()
    if bar is not None:
        bar.close()
    for e in world:
        e.close()
    return {"seed": seed, "dist": dist, "episodes_to_solve": solved_at, "episodes": len(returns),
            "returns": returns, "seconds": time.perf_counter() - t0}


def main(argv: Optional[list] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--max-episodes", type=int, default=None,
                   help="episodes before giving up (default: 1000 for reinforce, 2500 for ppo, which solved "
                        "CartPole after 1116-1697 episodes on the seeds 0-4)")
    p.add_argument("--algo", choices=["reinforce", "ppo"], default="reinforce")
    p.add_argument("--dist", choices=["pgest", "torch", "both"], default="both",
                   help="PPO only: pgest.Categorical + pgest.gae + ppo_loss, or the same in plain PyTorch")
    args = p.parse_args(argv)
    if args.max_episodes is None:
        args.max_episodes = 1000 if args.algo == "reinforce" else 2500
    results = []
    variants = [None] if args.algo == "reinforce" else (["pgest", "torch"] if args.dist == "both" else [args.dist])
    for variant in variants:
        for s in args.seeds:
            if variant is None:
                r = run(seed=s, max_episodes=args.max_episodes, progress=True)
            else:
                r = run_ppo(seed=s, dist=variant, max_episodes=args.max_episodes, progress=True)
            results.append(r)
            solved = r["episodes_to_solve"]
            name = args.algo if variant is None else f"ppo/{variant}"
            print(f"{name} seed {s}: " + (f"solved after {solved} episodes" if solved else
                                          f"not solved in {r['episodes']} episodes") + f" ({r['seconds']:.0f} s)")
    for variant in variants:
        rs = [r for r in results if r.get("dist") == variant]
        n = sum(r["episodes_to_solve"] is not None for r in rs)
        name = args.algo if variant is None else f"ppo/{variant}"
        print(f"{name}: solved {n} of {len(rs)} seeds within {args.max_episodes} episodes, "
              f"{sum(r['seconds'] for r in rs):.0f} s in all")
    return results


if __name__ == "__main__":
    main()
