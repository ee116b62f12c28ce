"""Strict test settings: 8 host devices, rank promotion raises, warnings are errors (pyproject)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
