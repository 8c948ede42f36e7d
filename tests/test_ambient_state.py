"""torch's ambient settings must not leak into the tensors pgest makes and
keeps (seeds, parameter buffers, records, scratch):

- a default device (``torch.set_default_device("cuda")``, common in LLM code):
  pgest's tensors follow the inputs; a CPU kernel handed a pointer into
  another device's memory would crash, not raise. Checked by setting the
  default to "meta" (no storage: a tensor pgest makes without naming a device
  fails loudly) before pgest is imported;
- inference mode: a rollout under ``torch.inference_mode()`` first, training
  after it; a buffer pgest first made inside inference mode could never be
  updated, or saved for backward, outside it;
- a default dtype (``torch.set_default_dtype(torch.float64)``): pgest's
  buffers keep the dtypes the kernels read.

Each is a fresh process whose every op must give the bits of a process that
set neither."""
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

import pgest

SCRIPT = r"""
import pickle, sys
import torch
if sys.argv[1] == "float64":
    torch.set_default_dtype(torch.float64)
if sys.argv[1] == "meta":
    import torch._dynamo  # torch 2.8's own import of it fails under a default device (pgest's import triggers it)
    torch.set_default_device("meta")
import pgest

cpu = dict(device="cpu")
f32 = dict(device="cpu", dtype=torch.float32)
g = lambda s: torch.Generator().manual_seed(s)
x = torch.randn(6, 50, generator=g(0), **f32) * 2
a = torch.randint(0, 50, (6,), generator=g(1), **cpu)
adv = torch.randn(6, generator=g(2), **f32)
h, w = torch.randn(4, 8, generator=g(3), **f32), torch.randn(30, 8, generator=g(4), **f32)
ha = torch.randint(0, 30, (4,), generator=g(5), **cpu)


def every_op(grads=True):
    # every op's outputs; grads=False: the backward ones forward only
    def grad_of(fn, t):
        if not grads:
            return fn(t)
        t = t.detach().clone().requires_grad_()
        fn(t).backward()
        return t.grad

    return {
        "sample": pgest.sample(x, num_samples=3, generator=g(6)),
        "sample_global_generator": (torch.manual_seed(7), pgest.sample(x))[1],
        "log_prob": pgest.log_prob(x, a),
        "log_prob_grad": grad_of(lambda t: (lambda o: o[0].sum() + o[1].sum())(pgest.log_prob(t, a)), x),
        "policy_loss_grad": grad_of(lambda t: pgest.policy_loss(t, a, adv, entropy_weight=0.1), x),
        "reinforce_grad": pgest.reinforce_grad(x.log_softmax(-1), a, num_samples=3, baseline="mean", generator=g(8)),
        "reinforce_grad_unnormalised": pgest.reinforce_grad(x, a, generator=g(9)),
        "reinforce_grad_table": pgest.reinforce_grad(x.log_softmax(-1), reward_table=x.cos(), num_samples=2,
                                                     baseline="rloo", generator=g(10)),
        "truncated_sample": pgest.sample(x, num_samples=2, temperature=0.7123, top_k=9, top_p=0.8765, min_p=0.0123,
                                         generator=g(11)),
        "truncated_log_prob": pgest.log_prob(x, a, top_k=50),
        "truncation": pgest.truncation(x, top_p=0.8765),
        "truncated_grad": grad_of(lambda t: pgest.log_prob(t, a, temperature=1.3, top_k=45)[0].sum(), x),
        "categorical": pgest.Categorical(logits=x).sample(generator=g(12)),
        "uniforms": pgest.philox.uniforms(3, 2, 1234),
        "gae": pgest.gae(adv.view(3, 2), adv.view(3, 2).cos(), torch.zeros(3, 2, dtype=torch.bool, **cpu), 0.99, 0.95),
        "linear_log_prob": pgest.linear_log_prob(h, w, ha),
        "linear_sample": pgest.linear_sample(h, w, num_samples=2, generator=g(13)),
        "linear_truncated": pgest.linear_sample(h, w, top_p=0.9, generator=g(14)),
        "linear_policy_loss_grad": grad_of(lambda t: pgest.linear_policy_loss(t, w, ha, adv[:4]), h),
    }


if sys.argv[1] == "inference":
    with torch.inference_mode():  # every op first here: a rollout
        every_op(grads=False)
out = every_op()


def plain(v):
    if isinstance(v, torch.Tensor):
        assert v.device.type == "cpu", v.device
        return v.tolist()
    if isinstance(v, tuple):
        return [plain(e) for e in v]
    return v


sys.stdout.buffer.write(pickle.dumps({k: plain(v) for k, v in out.items()}))
"""


def _run(setting: str, cwd) -> dict:
    # the pgest this test imported (installed, or a checkout's build), not
    # whatever a working directory holds
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(pgest.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return pickle.loads(r.stdout)


@pytest.mark.parametrize("setting", ["meta", "inference", "float64"])
def test_torchs_ambient_settings_leave_pgests_tensors_alone(setting, tmp_path):
    want, got = _run("none", tmp_path), _run(setting, tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name] == want[name], name
