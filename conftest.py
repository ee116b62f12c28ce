"""Strict test settings: 8 host devices, rank promotion raises, warnings are errors (pyproject)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Test helpers (tests/torch_oracle.py) import by name under --import-mode=importlib.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
