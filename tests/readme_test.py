"""Every python block of the README runs as written, each in a fresh namespace."""

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_blocks():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(source):
  for package in re.findall(r"^import .*\b(qwix|torch)\b", source, flags=re.MULTILINE):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"this block needs {package}")
  exec(compile(source, str(README), "exec"), {"__name__": "readme"})
