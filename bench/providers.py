"""What pgest is compared with, shared by the benchmark files.

- seed: the seed's listing, steps 2-3, in eager PyTorch.
- compiled: the best pure-PyTorch formulation we know, under torch.compile:
  Gumbel-max sampling and a comparison one-hot (no int64 one-hot, no multinomial).
- copy: a copy of the input, the memory floor of any pass over it.
"""
import functools

import torch
import torch.nn.functional as F


def seed_listing(log_probs, labels, baseline):
    batch_size, n_classes = log_probs.shape
    with torch.no_grad():
        actions = torch.multinomial(torch.exp(log_probs.float()), 1).view(-1)
        rewards = (actions == labels).float()
        gradients = (baseline - rewards) / batch_size
        one_hot_gradients = gradients[:, None] * F.one_hot(actions, n_classes)
    return actions, rewards, one_hot_gradients.to(log_probs.dtype)


def gumbel_formulation(log_probs, labels, baseline):
    u = torch.rand(log_probs.shape, dtype=torch.float32, device=log_probs.device)
    actions = torch.argmax(log_probs.float() - torch.log(-torch.log(u)), dim=-1)
    rewards = (actions == labels).float()
    coef = (baseline - rewards) / log_probs.shape[0]
    cols = torch.arange(log_probs.shape[1], device=log_probs.device)
    grad = torch.where(cols[None, :] == actions[:, None], coef[:, None], 0.0).to(log_probs.dtype)
    return actions, rewards, grad


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)
