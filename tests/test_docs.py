"""The documentation site (docs/: guides in Markdown, the API reference from
the docstrings) builds with Sphinx, warnings as errors."""
import pathlib

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    if not (DOCS / "conf.py").exists():
        pytest.skip("docs/ is not beside the tests (an installed copy)")
    build = pytest.importorskip("sphinx.cmd.build")
    pytest.importorskip("myst_parser")
    rc = build.build_main(["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")])
    assert rc == 0
    assert (tmp_path / "html" / "api.html").read_text().count("pgest.linear_policy_loss") >= 1


# What the guides' code blocks take as given (a block shows a step of a
# training loop, not its set-up): small tensors of the right shapes.
_SETUP = {
    "guide/rl.md": """
import torch, pgest
logits = torch.randn(8, 5, requires_grad=True)
actions = torch.randint(0, 5, (8,)); labels = torch.randint(0, 5, (8,)); advantages = torch.randn(8)
old_lp = torch.randn(8) - 2; adv = torch.randn(8); mask = torch.rand(8) < 0.8; ref_lp = torch.randn(8) - 2
rewards = torch.randn(6, 3); values = torch.randn(6, 3); dones = torch.rand(6, 3) < 0.2; gamma, lam = 0.99, 0.95
""",
    "guide/llm.md": """
import torch, pgest
hidden = torch.randn(16, 8, requires_grad=True); weight = torch.randn(50, 8, requires_grad=True)
actions = torch.randint(0, 50, (16,)); adv = torch.randn(16)
""",
    "guide/reinforce_grad.md": """
import torch, pgest
import torch.nn.functional as F
n_classes = K = 10; B = 32
model = torch.nn.Linear(4, n_classes + 1); inputs = torch.randn(B, 4)
labels = torch.randint(0, n_classes, (B,)); entropy_weight = 0.01
log_probs = torch.randn(B, K).log_softmax(-1).requires_grad_(); baseline = torch.rand(B)
""",
}
# blocks that need a torch.distributed process group (run by tests/test_vocab_parallel.py instead)
_NEEDS_A_GROUP = {"guide/distributed.md"}


def _guide_blocks():
    import re

    for page in sorted(DOCS.glob("guide/*.md")) if DOCS.exists() else []:
        name = page.relative_to(DOCS).as_posix()
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            yield pytest.param(name, code, id=f"{name}:{i}")


@pytest.mark.parametrize("page,code", list(_guide_blocks()))
def test_guide_code_blocks_run(page, code):
    if page in _NEEDS_A_GROUP:
        compile(code, page, "exec")  # at least valid Python
        return
    namespace = {}
    exec(_SETUP.get(page, "import torch, pgest"), namespace)
    try:
        exec(compile(code, page, "exec"), namespace)
    except ImportError as e:
        # an optional library the block shows (TRL, transformers) that this
        # machine lacks (the GPU machine has no TRL): skipped, not passed;
        # a missing pgest module is still a failure
        missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
        if not isinstance(missing, ModuleNotFoundError) or (missing.name or "pgest").startswith("pgest"):
            raise
        pytest.skip(f"{page} needs {missing.name}, not installed here")
