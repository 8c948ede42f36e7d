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
