"""CartPole-v1 with REINFORCE: rewards-to-go through GAE, a value-head
baseline, and the policy trained through pgest.

Each update collects a batch of whole episodes from several environments at
once, samples actions with ``pgest.sample``, computes advantages with
``pgest.gae`` (time-major, ``dones`` cutting episodes apart), normalises them,
and trains the policy with ``pgest.policy_loss`` (padding steps after an
episode ended are ``ignore_index``) and the value head with a squared error.
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


def main(argv: Optional[list] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--max-episodes", type=int, default=1000)
    args = p.parse_args(argv)
    results = []
    for s in args.seeds:
        r = run(seed=s, max_episodes=args.max_episodes, progress=True)
        results.append(r)
        solved = r["episodes_to_solve"]
        print(f"seed {s}: " + (f"solved after {solved} episodes" if solved else
                               f"not solved in {r['episodes']} episodes") + f" ({r['seconds']:.0f} s)")
    n = sum(r["episodes_to_solve"] is not None for r in results)
    print(f"solved {n} of {len(results)} seeds within {args.max_episodes} episodes")
    return results


if __name__ == "__main__":
    main()
