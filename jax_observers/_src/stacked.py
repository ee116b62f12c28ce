"""Observer states stacked by ``nn.scan``/``nn.vmap``/``nnx.scan``/``nnx.vmap``, and finding them.

A scanned layer's state has the scan axis in front of every leaf. Its qparams are the observer's
``calculate_qparams`` vmapped over those leading axes, whose count is the difference between the
stored leaves' ranks and the ranks of a fresh state for the layer's own input.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import jax
import numpy as np


def state_paths(tree, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  """Paths of the modules in a Flax collection that hold a ``'state'`` variable."""
  if not isinstance(tree, Mapping):
    return
  if "state" in tree and not isinstance(tree["state"], Mapping):
    yield prefix
  for key, value in tree.items():
    if key != "state":
      yield from state_paths(value, (*prefix, key))


def subtree(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def trees_equal(a, b) -> bool:
  """Same structure and the same values, leaf by leaf (NaNs equal)."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(
    np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    for x, y in zip(la, lb, strict=True)
  )


def leading_axes(config, state, spec, name: str) -> int:
  """How many stacked axes ``state`` has in front of the state ``config.init(spec)`` would give."""
  core = jax.eval_shape(config.init, spec)
  got, want = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(core)
  extra = {np.ndim(g) - len(w.shape) for g, w in zip(got, want, strict=False)}
  if len(got) != len(want) or len(extra) != 1 or min(extra) < 0:
    raise ValueError(
      f"the state at {name!r} does not fit its observer {type(config).__name__}: leaf shapes "
      f"{[np.shape(g) for g in got]}, expected {[w.shape for w in want]} after any stacked axes."
    )
  n = extra.pop()
  for g, w in zip(got, want, strict=True):
    if tuple(np.shape(g)[n:]) != tuple(w.shape):
      raise ValueError(
        f"the state at {name!r} has a leaf of shape {np.shape(g)}; its observer "
        f"{type(config).__name__} expects {w.shape} after {n} stacked axes."
      )
  return n


@functools.partial(jax.jit, static_argnums=(0, 1))
def _vmapped_qparams(config, axes: int, state):
  fn = config.calculate_qparams
  for _ in range(axes):
    fn = jax.vmap(fn)
  return fn(state)


def calculate_qparams(config, state, spec, name: str):
  """``config.calculate_qparams`` over every stacked copy of ``state`` (one compile per layout)."""
  return _vmapped_qparams(config, leading_axes(config, state, spec, name), state)
