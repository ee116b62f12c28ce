"""Concise reprs for states and qparams: shapes, ranges and values, never walls of numbers.

>>> import jax.numpy as jnp
>>> summarize(jnp.array(0.5))
'f32[] 0.5'
>>> summarize(jnp.array([3.0, -1.0, 2.0]))
'f32[3] -1 … 3'
>>> summarize(jnp.array([jnp.inf, jnp.inf]))
'f32[2] inf'
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int32": "i32", "uint8": "u8"}


def _fmt(v) -> str:
  dtype = np.asarray(v).dtype
  if dtype == np.bool_:
    return str(bool(v))
  return f"{float(v):.6g}" if np.issubdtype(dtype, np.floating) else str(int(v))


def summarize(value) -> str:
  """``dtype[shape]`` and the value (a scalar), the single value, or the finite range."""
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    return repr(value)
  dtype = _SHORT.get(str(value.dtype), str(value.dtype))
  head = f"{dtype}[{','.join(map(str, value.shape))}]"
  if isinstance(value, jax.core.Tracer):
    return f"{head} (traced)"
  a = np.asarray(value)
  if a.size == 0:
    return head
  if a.ndim == 0:
    return f"{head} {_fmt(a)}"
  lo, hi = a.min(), a.max()
  if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
    nans = int(np.isnan(a).sum())
    finite = a[~np.isnan(a)]
    if finite.size == 0:
      return f"{head} nan"
    lo, hi = finite.min(), finite.max()
    return f"{head} {_fmt(lo)} … {_fmt(hi)} ({nans} nan)"
  return f"{head} {_fmt(lo)}" if lo == hi else f"{head} {_fmt(lo)} … {_fmt(hi)}"


class ReadableRepr:
  """Mixin for dataclass pytrees: ``Name(field=f32[8] -1 … 3, ...)``."""

  def __repr__(self) -> str:
    fields = ", ".join(
      f"{f.name}={summarize(getattr(self, f.name))}" for f in dataclasses.fields(self)
    )
    return f"{type(self).__name__}({fields})"
