"""Guess the label: the reference recipe's policy-gradient experiment on scikit-learn's
8x8 digits.

An MLP with n_classes + 1 outputs plays a bandit: it samples a class, is told
only whether it was right (reward 1 or 0), subtracts a learned sigmoid
baseline (trained with binary cross entropy), adds an entropy regulariser, and
trains through ``pgest.reinforce_grad`` exactly as the reference recipe does. The
same MLP trained with cross entropy on the labels runs beside it.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import pgest
from pgest.examples import require
from pgest.reference import recipe_step

N_CLASSES = 10


def load_digits(seed: int = 0):
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = model_selection.train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=d.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_model(seed: int, hidden: int = 256) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, N_CLASSES + 1),
    )


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x)[:, :N_CLASSES].argmax(-1) == y).float().mean().item()


def pg_step(model, opt, inputs, labels, entropy_weight: float, estimator: str = "pgest") -> float:
    """One training step of the reference recipe; the estimator (steps 2-3) is
    pgest.reinforce_grad or, for comparison, the reference recipe's own PyTorch code.
    Returns the seconds spent in the estimator."""
    batch_size = labels.shape[0]
    # 1. log-probabilities and the baseline
    outputs = model(inputs)
    baseline = torch.sigmoid(outputs[:, -1])
    log_probs = torch.log_softmax(outputs[:, :N_CLASSES], -1)
    # 2-3. sample, reward, one-hot score gradient
    t0 = time.perf_counter()
    if estimator == "pgest":
        actions, rewards, grad = pgest.reinforce_grad(log_probs, labels, baseline=baseline)
    else:
        actions, rewards, grad = recipe_step(log_probs.detach(), labels, baseline.detach())
    spent = time.perf_counter() - t0
    opt.zero_grad()
    log_probs.backward(grad, retain_graph=True)
    # 4. train the baseline, regularise the policy
    loss = F.binary_cross_entropy(baseline, rewards)
    loss = loss + entropy_weight * torch.sum(log_probs * torch.exp(log_probs)) / batch_size
    loss.backward()
    opt.step()
    return spent


def ce_step(model, opt, inputs, labels) -> None:
    opt.zero_grad()
    F.cross_entropy(model(inputs)[:, :N_CLASSES], labels).backward()
    opt.step()


def run(steps: int = 3000, batch_size: int = 256, lr: float = 1e-3, entropy_weight: float = 0.01,
        seed: int = 0, eval_every: int = 100, progress: bool = False) -> Dict:
    """Train both models for ``steps`` minibatches; returns accuracies, curves
    and the estimator's time against the reference recipe."""
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    pg_model, ce_model = make_model(seed), make_model(seed)
    pg_opt = torch.optim.Adam(pg_model.parameters(), lr=lr)
    ce_opt = torch.optim.Adam(ce_model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curves: Dict[str, List] = {"step": [], "policy_gradient": [], "cross_entropy": []}
    bar = None
    if progress:
        bar = require("tqdm").tqdm(total=steps, desc="guess the label", unit="step")
    curves["step"].append(0)
    curves["policy_gradient"].append(accuracy(pg_model, x_te, y_te))
    curves["cross_entropy"].append(accuracy(ce_model, x_te, y_te))
    t_start = time.perf_counter()
    pg_time = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_tr), (batch_size,), generator=gen)
        pg_time += pg_step(pg_model, pg_opt, x_tr[idx], y_tr[idx], entropy_weight)
        ce_step(ce_model, ce_opt, x_tr[idx], y_tr[idx])
        if step % eval_every == 0 or step == steps:
            curves["step"].append(step)
            curves["policy_gradient"].append(accuracy(pg_model, x_te, y_te))
            curves["cross_entropy"].append(accuracy(ce_model, x_te, y_te))
            if bar is not None:
                bar.set_postfix(pg=f"{curves['policy_gradient'][-1]:.3f}", ce=f"{curves['cross_entropy'][-1]:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start

    # The estimator alone, pgest against the reference recipe, on the same batches.
    seed_model = make_model(seed)
    seed_opt = torch.optim.Adam(seed_model.parameters(), lr=lr)
    reps = min(steps, 300)
    ours = sum(pg_step(seed_model, seed_opt, x_tr[:batch_size], y_tr[:batch_size], entropy_weight, "pgest")
               for _ in range(reps))
    theirs = sum(pg_step(seed_model, seed_opt, x_tr[:batch_size], y_tr[:batch_size], entropy_weight, "seed")
                 for _ in range(reps))
    return {
        "policy_gradient_accuracy": curves["policy_gradient"][-1],
        "cross_entropy_accuracy": curves["cross_entropy"][-1],
        "curves": curves,
        "seconds": wall,
        "estimator_us": {"pgest": 1e6 * ours / reps, "seed": 1e6 * theirs / reps},
        "pg_estimator_seconds": pg_time,
        "batch_size": batch_size,
    }


def plot(result: Dict, path: str) -> None:
    plt = require("matplotlib.pyplot")
    c = result["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["step"], c["policy_gradient"], label="policy gradient (pgest.reinforce_grad, 0/1 rewards)")
    ax.plot(c["step"], c["cross_entropy"], label="cross entropy (labels)")
    ax.set_xlabel("training step (batch of 256)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Guess the label on 8x8 digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: Dict) -> str:
    us = result["estimator_us"]
    return (f"test accuracy: policy gradient {result['policy_gradient_accuracy']:.3f}, "
            f"cross entropy {result['cross_entropy_accuracy']:.3f} ({result['seconds']:.1f} s)\n"
            f"estimator step (sample, reward, one-hot gradient; batch {result['batch_size']} x 10): "
            f"pgest {us['pgest']:.1f} us, "
            f"reference recipe {us['seed']:.1f} us ({us['seed'] / us['pgest']:.1f}x faster)")


def main(argv: Optional[list] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="FILE.png")
    args = p.parse_args(argv)
    result = run(steps=args.steps, seed=args.seed, progress=True)
    print(report(result))
    if args.plot:
        plot(result, args.plot)
        print(f"learning curves written to {args.plot}")
    return result


if __name__ == "__main__":
    main()
