"""Strict test settings: 8 host devices, rank promotion raises, warnings are errors (pyproject).

``pytest --without-torch`` makes torch, torchao and onnxruntime unimportable for the run: what is
left is the torch-free core suite (conformance, numerics against NumPy references, Flax), which CI
runs on its own so that a stray oracle import in the core fails there.
"""

import importlib.abc
import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Test helpers (tests/torch_oracle.py, tests/registry.py) import by name under --import-mode=importlib,
# and the examples as ``from examples import demo``.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
sys.path.insert(0, os.path.dirname(__file__))

ORACLES = ("torch", "torchao", "onnxruntime")

# jax_observers.qwix needs the optional qwix package; without it, its doctests and notebook are
# not collected (tests/qwix_test.py skips by itself).
collect_ignore = []
if importlib.util.find_spec("qwix") is None:
  collect_ignore += [
    "jax_observers/qwix.py",
    "jax_observers/_src/ptq/qwix_bridge.py",
    "notebooks/06_qwix_ptq.ipynb",
  ]


class _BlockOracles(importlib.abc.MetaPathFinder):
  """Refuses the oracle packages, as if they were not installed."""

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ORACLES:
      raise ModuleNotFoundError(f"No module named {name!r} (pytest --without-torch)", name=name)
    return None


def pytest_addoption(parser):
  parser.addoption(
    "--without-torch",
    action="store_true",
    help="make torch, torchao and onnxruntime unimportable: run the torch-free core suite",
  )


def pytest_configure(config):
  if config.getoption("--without-torch"):
    if any(name.split(".")[0] in ORACLES for name in sys.modules):
      raise RuntimeError("--without-torch: an oracle package was imported before the tests started")
    sys.meta_path.insert(0, _BlockOracles())
  elif os.environ.get("CI"):
    # In CI the parity tests must run, not skip.
    for package in (*ORACLES, "onnx", "qwix"):
      if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"CI is set but {package} is not installed: pip install -e '.[test]'")
