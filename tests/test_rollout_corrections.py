"""pgest.rollout_corrections: TRL's and verl's rollout corrections against
plain PyTorch versions of their definitions written here, and against verl's
own module where it imports (PGEST_VERL_PATH: a directory holding verl 0.9.1
and its light dependencies, e.g. ``pip install --no-deps --target DIR verl
tensordict omegaconf ...``; skipped otherwise)."""
import math
import os
import sys
import types

import pytest
import torch

from pgest import rollout_corrections as rc


def _batch(seed=0, B=6, T=9, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    roll = old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[0] = 1
    mask[4] = 0  # a sequence with no response token
    return old, roll, mask


# ---- TRL ---------------------------------------------------------------------------

def _trl_reference(old, samp, mask, mode, cmax, cmin):
    # GRPOTrainer._generate_and_score_completions (TRL 1.16), written out
    d = torch.nan_to_num((old - samp) * mask, nan=0.0)
    seq = mode.startswith("sequence")
    r = torch.exp(d.sum(-1, keepdim=True) if seq else d)
    if mode.endswith("truncate"):
        r = torch.clamp(r, min=cmin, max=cmax)
    else:
        lo = -math.inf if cmin is None else cmin
        hi = math.inf if cmax is None else cmax
        r = r.masked_fill((r < lo) | (r > hi), 0.0)
    mb = mask.bool()
    delta = (old - samp).abs()
    delta = delta[mb & ~torch.isnan(delta)]
    flat = r.flatten() if seq else r[mb]
    return r, [delta.mean(), delta.max(), flat.min(), flat.mean(), flat.max()]


@pytest.mark.parametrize("mode", rc.TRL_MODES)
@pytest.mark.parametrize("bounds", [(3.0, None), (1.5, 0.5), (None, 0.8)])
def test_trl_importance_sampling_is_trls_definition(mode, bounds):
    old, samp, mask = _batch(1, scale=0.6)
    samp[1, 2] = float("nan")  # a token the sampler could not score
    cmax, cmin = bounds
    ratio, metrics = rc.trl_importance_sampling(old, samp, mask, mode=mode, clip_max=cmax, clip_min=cmin)
    want, figures = _trl_reference(old, samp, mask.double(), mode, cmax, cmin)
    assert ratio.shape == ((6, 1) if mode.startswith("sequence") else (6, 9))
    torch.testing.assert_close(ratio, want, rtol=1e-12, atol=0)
    keys = ["sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/max"]
    assert list(metrics) == keys
    for k, v in zip(keys, figures):
        assert metrics[k] == pytest.approx(v.item(), rel=1e-12, abs=1e-15), k
    # independent facts: truncation bounds the ratio, masking zeroes what lies outside
    if mode.endswith("truncate") and cmax is not None:
        assert ratio.max() <= cmax
    if mode == "token_mask" and cmax is not None:
        raw = torch.exp(torch.nan_to_num((old - samp) * mask, nan=0.0))
        assert torch.equal(ratio == 0, (raw > cmax) | (raw < (cmin or 0)))


def test_trl_importance_sampling_errors_and_empty():
    old, samp, mask = _batch()
    with pytest.raises(ValueError, match="mode must be one of"):
        rc.trl_importance_sampling(old, samp, mask, mode="token")
    with pytest.raises(ValueError, match="sampling_log_prob must have the shape"):
        rc.trl_importance_sampling(old, samp[:, :3], mask)
    with pytest.raises(TypeError, match="old_log_prob must be a float tensor"):
        rc.trl_importance_sampling(mask, samp, mask)
    _, metrics = rc.trl_importance_sampling(old, samp, torch.zeros_like(mask), mode="token_mask")
    assert all(v == 0.0 for v in metrics.values())


# ---- verl: the weights and masks by definition ------------------------------------------

def test_verl_weights_and_masks_by_definition():
    old, roll, mask = _batch(2)
    m = mask.double()
    lr = old - roll
    w, new_mask, metrics = rc.verl_rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=1.3)
    torch.testing.assert_close(w, torch.exp(lr).clamp(max=1.3) * m, rtol=1e-12, atol=0)
    assert torch.equal(new_mask, mask) and new_mask.dtype == mask.dtype
    w, _, _ = rc.verl_rollout_correction(old, roll, mask, rollout_is="sequence", rollout_is_threshold="0.5_4")
    seq = torch.exp((lr * m).sum(-1, keepdim=True)).expand_as(lr) * m
    torch.testing.assert_close(w, torch.where((seq >= 0.5) & (seq <= 4), seq, 0.0), rtol=1e-12, atol=0)
    # the geometric-mean filter: a sequence is kept when exp(mean log ratio) is in [1/1.2, 1.2]
    _, new_mask, metrics = rc.verl_rollout_correction(old, roll, mask, rollout_rs="seq_mean_k1",
                                                      rollout_rs_threshold=1.2)
    geo = torch.exp((lr * m).sum(-1) / m.sum(-1).clamp_min(1e-8))
    kept = (geo >= 1 / 1.2 - 1e-12) & (geo <= 1.2)
    assert torch.equal(new_mask, mask * kept[:, None].long())
    assert metrics["rollout_corr/kl"] == pytest.approx(((roll - old) * m).sum().item() / m.sum().item(), rel=1e-9)
    for bad, err in ((dict(rollout_is="tok"), "rollout_is must be"), (dict(rollout_rs="token_k9",
                     rollout_rs_threshold=2), "not among"), (dict(rollout_rs="token_k1"), "must be given"),
                     (dict(rollout_is="token", rollout_is_threshold="3_1"), "lower <= upper")):
        with pytest.raises(ValueError, match=err):
            rc.verl_rollout_correction(old, roll, mask, **bad)
    with pytest.raises(ValueError, match="at least one token"):
        rc.verl_rollout_correction(old, roll, torch.zeros_like(mask))


# ---- verl: against verl's own module -------------------------------------------------

def _verl_module():
    path = os.environ.get("PGEST_VERL_PATH")
    if not path:
        pytest.skip("PGEST_VERL_PATH is not set (verl's rollout_corr_helper is compared where it imports)")
    saved = dict(sys.modules)
    sys.path.insert(0, path)
    try:
        if "ray" not in sys.modules:
            try:
                import ray  # noqa: F401
            except ImportError:  # verl.protocol imports ray; the helper itself never calls it
                ray = types.ModuleType("ray")
                ray.ObjectRef = type("ObjectRef", (), {})

                class _Any:
                    def __init__(self, *a, **k):
                        pass

                    def __call__(self, *a, **k):
                        return a[0] if a and callable(a[0]) else self

                    def __getattr__(self, n):
                        if n.startswith("__"):
                            raise AttributeError(n)
                        return _Any()

                def _attr(n):
                    if n.startswith("__"):
                        raise AttributeError(n)
                    return _Any()

                ray.__getattr__ = _attr
                sys.modules["ray"] = ray
        import verl.trainer.ppo.rollout_corr_helper as helper
    except ImportError as e:
        sys.modules.clear()
        sys.modules.update(saved)
        pytest.skip(f"verl does not import here: {e}")
    finally:
        sys.path.remove(path)
    return helper


CASES = [dict(rollout_is="token", rollout_is_threshold=2.0),
         dict(rollout_is="token", rollout_is_threshold="0.7_1.4", rollout_is_batch_normalize=True),
         dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True),
         dict(rollout_is="sequence", rollout_is_threshold="0.2_5"),
         dict(rollout_rs="token_k1", rollout_rs_threshold=1.5),
         dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="0.05,0.04"),
         dict(rollout_rs="seq_sum_k1,seq_mean_k1", rollout_rs_threshold="0.3_3,1.3"),
         dict(rollout_rs="seq_sum_k2,seq_mean_k3,seq_max_k2,seq_max_k3", rollout_rs_threshold=0.1),
         dict(rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_mean_k2", rollout_rs_threshold=0.02),
         dict()]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_verl_rollout_correction_is_verls(case):
    helper = _verl_module()
    old, roll, mask = _batch(3 + case)
    kw = CASES[case]
    w, new_mask, metrics = rc.verl_rollout_correction(old, roll, mask, **kw)
    proto, want_mask, want = helper.compute_rollout_correction_and_rejection_mask(old, roll, mask, **kw)
    assert torch.equal(new_mask, want_mask)
    if proto is None:
        assert w is None
    else:
        torch.testing.assert_close(w, proto.batch["rollout_is_weights"], rtol=1e-12, atol=0)
    assert sorted(metrics) == sorted(want)
    for k in want:
        assert metrics[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
