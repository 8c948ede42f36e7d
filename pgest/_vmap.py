"""vmap rules for the registered ops (torch.func.vmap, and the batched
gradients of gradcheck(check_batched_grad=True), which vmap the backward).

Rows are independent in every row op, so a vmapped batch dimension folds
into the rows: (B, R, K) logits become (B * R, K), one call, and the outputs
unfold again. Ops whose arguments cannot fold that way (a batched weight of
the fused head, whose gradient must stay per batch element) run once per
batch element instead.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

ROWS = "rows"    # batch folds into dim 0: (B, R, ...) -> (B * R, ...)
STATS = "stats"  # batch folds into dim 1: (B, n, R) -> (n, B * R)


def _fold(t: Tensor, kind: str, batch: int, dim: Optional[int]) -> Tensor:
    t = t.unsqueeze(0).expand((batch,) + tuple(t.shape)) if dim is None else t.movedim(dim, 0)
    if kind == ROWS:
        return t.reshape((batch * t.shape[1],) + tuple(t.shape[2:]))
    return t.movedim(0, 1).reshape(t.shape[1], batch * t.shape[2])


def _unfold(t: Tensor, kind: str, batch: int):
    if kind == ROWS:
        return t.view((batch, t.shape[0] // batch) + tuple(t.shape[1:])), 0
    return t.view(t.shape[0], batch, t.shape[1] // batch), 1


def register_rows(op, arg_kinds: Sequence[Optional[str]], out_kinds: Sequence[str]) -> None:
    """A vmap rule that folds the batch into the rows. ``arg_kinds``: ROWS,
    STATS or None (an argument that is not a tensor of rows: it must not be
    batched, else the op runs once per batch element)."""
    def rule(info, in_dims, *args):
        if any(d is not None and k is None for d, k in zip(in_dims, arg_kinds)):
            return _per_element(op, info.batch_size, in_dims, args)
        folded = [a if k is None or a is None else _fold(a, k, info.batch_size, d)
                  for a, d, k in zip(args, in_dims, arg_kinds)]
        out = op(*folded)
        got = [_unfold(o, k, info.batch_size) for o, k in zip(out if isinstance(out, tuple) else (out,), out_kinds)]
        if isinstance(out, tuple):
            return tuple(o for o, _ in got), tuple(d for _, d in got)
        return got[0]

    _register(op, rule)


def register_per_element(op) -> None:
    """A vmap rule that calls the op once per batch element and stacks."""
    _register(op, lambda info, in_dims, *args: _per_element(op, info.batch_size, in_dims, args))


def register_refusal(op, what: str) -> None:
    """A vmap rule that raises what to do instead (ops that draw)."""
    def rule(info, in_dims, *args):
        raise NotImplementedError(
            f"{what} draws random actions and does not run under torch.func.vmap: draw outside the transform and "
            "pass the actions in (log_prob, entropy, policy_loss and Categorical.log_prob support vmap and grad)")

    _register(op, rule)


def _per_element(op: Callable, batch: int, in_dims, args):
    outs = [op(*[a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]) for b in range(batch)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(list(o)) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _register(op, rule) -> None:
    if hasattr(torch.library, "register_vmap"):  # torch >= 2.5; older ones keep torch's own error
        torch.library.register_vmap(op, rule)
