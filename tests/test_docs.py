"""The examples in the README and in docstrings run as written."""

import doctest
import pathlib
import re

import pytest

import balancer.api
import balancer.load

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run_in_order():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has no python examples"
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README


@pytest.mark.parametrize("module", [balancer.api, balancer.load], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
