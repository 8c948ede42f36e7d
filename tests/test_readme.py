"""Every Python code block of the README runs (a block is a complete
program), so the landing page's examples cannot rot."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if README.exists() else []


def test_the_readme_has_examples():
    if not README.exists():
        pytest.skip("README.md is not beside the tests (an installed copy)")
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
