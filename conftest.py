"""Strict test settings: 8 host devices, rank promotion raises, warnings are errors (pyproject)."""

import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Test helpers (tests/torch_oracle.py) import by name under --import-mode=importlib.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

# In CI the torch parity tests must run, not skip.
if os.environ.get("CI") and importlib.util.find_spec("torch") is None:
  raise RuntimeError("CI is set but torch is not installed: pip install torch==2.13.0")
