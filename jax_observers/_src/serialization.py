"""``state_dict`` / ``load_state_dict``: observer state as torch's ``state_dict()`` keys and shapes.

``state_dict(observer, state)`` gives NumPy arrays keyed and shaped like the torch observer's
``state_dict()`` (``eps`` [1], ``min_val``/``max_val`` [] or [C], per-channel never-observed [0]), so
``torch_observer.load_state_dict({k: torch.from_numpy(v) ...})`` works; ``load_state_dict`` takes that
dict back, or a real torch observer's ``state_dict()`` (tensors are copied, never shared). Every
loader validates its values through :func:`checked` (and :func:`running_range`, :func:`check_eps`),
so all of them refuse the same things with the same message: ``Obs state_dict['key'] = value:
reason``. Each observer's module registers its layout with :func:`register` (or
:func:`register_arrays`); this module knows no observer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jax_observers._src.base import Observer


@functools.singledispatch
def _to_dict(observer, state) -> dict[str, np.ndarray]:
  raise TypeError(f"state_dict does not know {type(observer).__name__}.")


@functools.singledispatch
def _from_dict(observer, d: dict[str, np.ndarray], *, strict: bool, example):
  raise TypeError(f"load_state_dict does not know {type(observer).__name__}.")


def register(cls: type, to_dict: Callable, from_dict: Callable) -> None:
  """Adds ``cls`` and its subclasses: ``to_dict(obs, state)``, ``from_dict(obs, d, *, strict, example)``."""
  _to_dict.register(cls)(to_dict)
  _from_dict.register(cls)(from_dict)


def to_numpy(value) -> np.ndarray:
  """A private NumPy copy of ``value``: a torch tensor (cloned first, so the caller's buffers stay
  resizable), a JAX or NumPy array, or a number. bfloat16/float16/float8 values become float32,
  exactly (every one of them is a float32)."""
  if hasattr(value, "detach"):  # a torch tensor; .numpy() on its own storage would pin it.
    value = value.detach().cpu().clone()
    if value.is_floating_point() and value.dtype.itemsize < 4:
      value = value.float()  # NumPy has no bfloat16/float8; float32 holds them exactly.
    return value.numpy()
  out = np.array(value, copy=True)
  if out.dtype.kind == "V" or (np.issubdtype(out.dtype, np.floating) and out.dtype.itemsize < 4):
    out = out.astype(np.float32)  # ml_dtypes bfloat16/float8 (kind 'V') and float16: exact
  return out


def _summary(value: np.ndarray) -> str:
  if value.size <= 8:
    return f"{value.dtype.name}{list(value.shape)} {value.tolist()}"
  return f"{value.dtype.name}{list(value.shape)}"


def refuse(observer, key: str, value, reason: str):
  """The loader's one error: ``Observer state_dict['key'] = <value>: <reason>.``"""
  value = np.asarray(value)
  raise ValueError(f"{type(observer).__name__} state_dict[{key!r}] = {_summary(value)}: {reason}.")


def _first(mask: np.ndarray, value: np.ndarray) -> str:
  idx = np.argwhere(mask)[0]
  where = tuple(int(i) for i in idx)
  return f"e.g. {value[where].item()!r} at index {list(where)}, {int(mask.sum())} entries in all"


def checked(
  observer,
  key: str,
  value: np.ndarray,
  *,
  kind: str = "float",
  shapes=None,
  finite: bool = False,
  nonnegative: bool = False,
) -> np.ndarray:
  """``value`` validated and converted: the one path every loader's arrays go through.

  Args:
    observer: named in errors.
    key: the state-dict key, named in errors.
    value: a NumPy array from :func:`to_numpy`.
    kind: ``'float'`` (float32 out; integers only if exact), ``'int'`` (int32 out; floats only if
      integral, values inside int32), ``'count'`` (int32 counts of integral values, saturating at
      ``2**31 - 1``) or ``'flag'`` (one value, bool out).
    shapes: a list of allowed shapes (``None``: any).
    finite: refuse NaN and ``±inf``.
    nonnegative: refuse negative values.

  Raises:
    ValueError: naming ``key``, the value and what was expected.
  """
  value = np.asarray(value)
  if value.dtype == object or not (
    np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
  ):
    refuse(observer, key, value, "expected a numeric array")
  if shapes is not None and tuple(value.shape) not in [tuple(s) for s in shapes]:
    wanted = " or ".join(str(list(s)) for s in shapes)
    refuse(observer, key, value, f"expected shape {wanted}")
  if kind == "flag":
    if value.size != 1:
      refuse(observer, key, value, "expected one flag value")
    return value.reshape(-1)
  if np.issubdtype(value.dtype, np.complexfloating):
    refuse(observer, key, value, "expected real values")
  wide = value.astype(np.float64) if value.dtype != np.float64 else value
  if finite and not np.all(np.isfinite(wide)):
    bad = ~np.isfinite(wide)
    refuse(observer, key, value, f"expected finite values, {_first(bad, value)}")
  if nonnegative and np.any(wide < 0):
    refuse(observer, key, value, f"expected values >= 0, {_first(wide < 0, value)}")
  if kind == "float":
    out = value.astype(np.float32)
    if not np.issubdtype(value.dtype, np.floating) and np.any(out.astype(np.float64) != wide):
      refuse(observer, key, value, "integers that float32 cannot hold exactly")
    return out
  integral = np.isfinite(wide) & (np.floor(wide) == wide)
  if not np.all(integral):
    refuse(observer, key, value, f"expected integers, {_first(~integral, value)}")
  if kind == "count":
    return np.minimum(wide, _INT32_MAX).astype(np.int32)  # counts saturate, as the state's do
  inside = (wide >= np.iinfo(np.int32).min) & (wide <= _INT32_MAX)
  if not np.all(inside):
    refuse(observer, key, value, f"expected int32 values, {_first(~inside, value)}")
  return wide.astype(np.int32)


_INT32_MAX = np.iinfo(np.int32).max


def state_dict(observer: Observer, state) -> dict[str, np.ndarray]:
  """The observer's state as torch's ``state_dict()`` would hold it, as writable NumPy arrays."""
  return _to_dict(observer, state)


def load_state_dict(observer: Observer, d: Mapping, *, strict: bool = True, example=None):
  """The state stored in ``d`` (ours or torch's ``state_dict()``), checked against ``observer``.

  Every value goes through one validation path (:func:`checked`): shape, dtype, finiteness, the
  sign of counts, the histogram grid's identity; errors name the key and the value. ``d`` and its
  tensors are copied, never changed (torch's buffers stay resizable); bfloat16/float16 buffers
  load exactly as float32.

  Args:
    observer: the config the state belongs to.
    d: a mapping of torch buffer names to arrays or torch tensors.
    strict: refuse unknown keys, an ``eps`` that differs from ``observer.eps`` (torch silently
      keeps the loaded one, or, through ``load_observer_state_dict``, resets it), and a NaN or
      inverted running range (torch's state after a NaN batch, or after float32 cancellation in a
      moving average); with ``strict=False`` those entries load as never observed.
    example: an input example, for observers whose torch state holds no arrays (RecordingObserver).

  Raises:
    KeyError: a key the observer needs is missing.
    ValueError: unknown keys (strict), an eps mismatch (strict), or a value of the wrong shape,
      dtype, sign or finiteness.
  """
  if not isinstance(d, Mapping):
    raise TypeError(f"load_state_dict takes a mapping of names to arrays; got {type(d).__name__}.")
  d = {k: to_numpy(v) for k, v in d.items()}
  return _from_dict(observer, d, strict=strict, example=example)


def take(d: dict, keys: tuple[str, ...], observer, strict: bool) -> list[np.ndarray]:
  """The values of ``keys``; a missing key is a KeyError, an unknown one (strict) a ValueError."""
  missing = [k for k in keys if k not in d]
  if missing:
    raise KeyError(f"{type(observer).__name__} state_dict is missing {missing}; got {sorted(d)}.")
  extra = sorted(set(d) - set(keys))
  if strict and extra:
    raise ValueError(f"{type(observer).__name__} state_dict has unexpected keys {extra}.")
  return [to_numpy(d[k]) for k in keys]


def check_eps(eps: np.ndarray, observer, strict: bool, key: str = "eps") -> None:
  """``eps`` is one float; under ``strict``, a ValueError when it is not the observer's."""
  eps = checked(observer, key, eps, shapes=[(1,), ()])
  stored = float(eps.reshape(-1)[0])
  if strict and np.float32(stored) != np.float32(observer.eps):
    refuse(
      observer,
      key,
      eps,
      f"differs from the observer's eps={observer.eps!r}; build the observer with that eps or "
      "pass strict=False",
    )


def running_range(
  observer, min_val, max_val, *, strict: bool, shapes, names=("min_val", "max_val")
):
  """float32 ``(min_val, max_val)`` validated: shapes, then NaN and inverted ranges.

  A valid entry has ``min_val <= max_val`` or is ``(+inf, -inf)`` (never observed). NaN (torch's
  state after a NaN batch) and ``min_val > max_val`` (float32 cancellation in torch's moving
  average) are refused under ``strict`` and load as never observed otherwise.
  """
  lo = checked(observer, names[0], min_val, shapes=shapes)
  hi = checked(observer, names[1], max_val, shapes=shapes)
  if lo.shape != hi.shape:
    refuse(observer, names[1], hi, f"its shape differs from {names[0]}'s {list(lo.shape)}")
  fresh = (lo == np.inf) & (hi == -np.inf)
  bad = ~(lo <= hi) & ~fresh
  if not bad.any():
    return lo, hi
  if strict:
    what = "NaN" if np.isnan(lo[bad]).any() or np.isnan(hi[bad]).any() else "min_val > max_val"
    refuse(
      observer,
      names[0],
      lo,
      f"with {names[1]} = {_summary(hi)}, {int(bad.sum())} entr(y/ies) hold {what}: the running "
      "range is poisoned (a NaN batch) or inverted (float32 cancellation in a moving average). "
      "Pass strict=False to load those entries as never observed",
    )
  return np.where(bad, np.float32(np.inf), lo), np.where(bad, np.float32(-np.inf), hi)


def register_arrays(observer_cls: type, state_cls: type, fields: Sequence[str]) -> None:
  """Registers ``observer_cls``: its state is ``state_cls(**{field: float32 array})``."""
  fields = tuple(fields)

  def to_dict(observer, state) -> dict[str, np.ndarray]:
    return {name: np.array(getattr(state, name), np.float32) for name in fields}

  def from_dict(observer, d, *, strict: bool, example):
    arrays = take(d, fields, observer, strict)
    values = {k: checked(observer, k, v) for k, v in zip(fields, arrays, strict=True)}
    for k, v in values.items():
      if np.isnan(v).any():  # NaN never enters these states; a NaN value is a corrupt one.
        refuse(observer, k, v, "NaN, which no update of this observer produces")
    if "min_val" in values and "max_val" in values:
      values["min_val"], values["max_val"] = running_range(
        observer, values["min_val"], values["max_val"], strict=strict, shapes=None
      )
    if example is not None:
      expected = observer.init(example)
      for k, v in values.items():
        if v.shape != np.shape(getattr(expected, k)):
          refuse(
            observer, k, v, f"inputs like the example need shape {np.shape(getattr(expected, k))}"
          )
    return state_cls(**values)

  register(observer_cls, to_dict, from_dict)
