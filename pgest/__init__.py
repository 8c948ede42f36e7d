"""pgest: fused score-function (REINFORCE) gradient estimators for
categorical policies, in native CPU kernels exposed to PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

import torch as _torch

from . import _native  # noqa: F401, I001  (first: a clear error if the native module is missing)

# isort: split
from . import _C, baselines, objectives, philox, rollout_corrections
from .categorical import Categorical
from .device_errors import check_errors, set_sync_errors, sync_errors
from .linear.head import LinearLogProb, LinearSample, linear_log_prob, linear_sample
from .linear.kl_penalty import LinearKLPenalty, linear_kl_penalty
from .linear.policy_loss import linear_policy_loss
from .log_prob import LogProb, entropy, log_prob
from .policy_loss import policy_loss
from .reinforce import Reinforce, reinforce
from .reinforce_grad import ReinforceGrad, reinforce_grad
from .returns import discounted_returns, gae
from .sample import Sample, TruncatedSample, sample
from .truncation import Truncation, truncation


def build_info() -> dict:
    """What this build of pgest contains and what it runs on."""
    info = {"version": __version__, "torch": _torch.__version__}
    info.update(_C.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["threads"] = _torch.get_num_threads()
    return info


__all__ = [
    "__version__",
    "baselines",
    "build_info",
    "Categorical",
    "check_errors",
    "discounted_returns",
    "entropy",
    "gae",
    "linear_kl_penalty",
    "linear_log_prob",
    "linear_policy_loss",
    "linear_sample",
    "LinearKLPenalty",
    "LinearLogProb",
    "LinearSample",
    "log_prob",
    "LogProb",
    "objectives",
    "philox",
    "policy_loss",
    "reference",
    "Reinforce",
    "reinforce",
    "reinforce_grad",
    "ReinforceGrad",
    "rollout_corrections",
    "Sample",
    "sample",
    "set_sync_errors",
    "sync_errors",
    "TruncatedSample",
    "Truncation",
    "truncation",
]


def __getattr__(name: str):
    # pgest.reference (the float64 PyTorch reference) is public but imported
    # on first use: no ordinary call needs it
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'pgest' has no attribute {name!r}")
