"""The docstring examples of every public name run as tests, each public name is in the API reference, and the reference builds."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import refiner

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [n for n in refiner.__all__ if n != "__version__"]
# Names whose example lives elsewhere: the error subclasses (RefinerError's example catches one), and Server (serve makes one).
NO_EXAMPLE = {n for n in PUBLIC if isinstance(getattr(refiner, n), type) and issubclass(getattr(refiner, n), refiner.RefinerError)} - {"RefinerError"}
NO_EXAMPLE |= {"Server"}


def _examples(name: str) -> list[doctest.DocTest]:
    """The doctests in a public object's own docstring (not its members': those run with their own name)."""
    obj = getattr(refiner, name)
    return [t for t in doctest.DocTestFinder(recurse=False).find(obj, f"refiner.{name}", globs={}) if t.examples]


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    """Each public name carries an example (bar the few in NO_EXAMPLE), and every example gives the output it shows."""
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    tests = _examples(name)
    if not tests and name in NO_EXAMPLE:
        return
    assert tests, f"refiner.{name}'s docstring has no example (>>> lines)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} of refiner.{name}'s examples gave other output (see the report above)"


def test_every_public_name_is_in_the_api_reference():
    reference = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in PUBLIC if n not in {"RefinerError", "ConfigError", "CheckpointError", "UnsafeCheckpointError", "LayerError",
                                             "DataError", "DataLayoutError", "ExportValidationError", "DivergedError"}
               and f"::: {inspect.getmodule(getattr(refiner, n)).__name__}.{n}\n" not in reference]  # fmt: skip
    assert not missing, f"docs/api.md has no entry for {', '.join(missing)}"
    assert "::: refiner.errors\n" in reference


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_api_reference_builds_without_a_warning(tmp_path):
    """`make docs` in strict mode: a broken cross-reference or an undocumented parameter name fails the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Map two nets layer by layer" in page and "Examples" in page  # docstrings rendered, with their examples
