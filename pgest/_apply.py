"""The eager routes' entry into an autograd.Function, written once."""
from __future__ import annotations

import torch


def fast_apply(fn_class):
    """``fn_class.apply`` without its Python wrapper. Function.apply's wrapper
    binds default arguments, checks for functorch transforms (the ops send
    those to their registered ops before getting here) and maps
    unwrap_dead_wrappers over every argument: about as much as the rest of a
    64-row step's forward. The C entry point it ends in is called directly
    (a detail of torch's, which the whole test suite exercises)."""
    return super(torch.autograd.Function, fn_class).apply
