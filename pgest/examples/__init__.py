"""Runnable examples of pgest inside training loops (also used by the
``pgest`` command and, at small sizes, by the tests). Their heavier
dependencies live in the ``examples`` extra: ``pip install ".[examples]"`` from
a checkout (pgest is not on a package index)."""
from __future__ import annotations

import importlib


def require(module: str, extra: str = "examples"):
    """Import an optional dependency, or stop with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f"this needs the optional dependency '{module.split('.')[0]}': "
            f'pip install ".[{extra}]" in a checkout of pgest (or pip install {module.split(".")[0]})'
        ) from None
