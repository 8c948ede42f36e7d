import torch

import pgest
from pgest import _C


def test_build_info():
    info = pgest.build_info()
    assert info["version"] == pgest.__version__
    for key in ["openmp", "cuda_compiled", "cuda_archs", "compiler", "cpu_isa", "cpu_isas_compiled"]:
        assert key in info
    assert isinstance(info["cuda_archs"], list)
    assert info["cpu_isa"] in info["cpu_isas_compiled"]
    assert "generic" in info["cpu_isas_compiled"]


def test_set_cpu_isa_rejects_unknown_names():
    assert not _C.set_cpu_isa("sse9")
    assert _C.cpu_isa_usable("generic")


def test_half_and_bfloat16_gradients_round_like_torch():
    # grad entries are formed in float64 and rounded once to the output dtype
    for dtype in [torch.float16, torch.bfloat16]:
        B = 3
        out = pgest.reinforce_grad(torch.zeros(B, 1, dtype=dtype), reward_table=torch.ones(1), baseline=1 / 3)
        expected = torch.tensor((1 / 3 - 1) / B, dtype=torch.float64).to(dtype)
        assert (out.grad == expected).all()
