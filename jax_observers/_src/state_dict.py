"""``state_dict`` / ``load_state_dict``: observer state as torch's ``state_dict()`` keys and shapes.

``state_dict(observer, state)`` gives NumPy arrays keyed and shaped like the torch observer's
``state_dict()`` (``eps`` [1], ``min_val``/``max_val`` [] or [C], per-channel never-observed [0]), so
``torch_observer.load_state_dict({k: torch.from_numpy(v) ...})`` works; ``load_state_dict`` takes that
dict back, or a real torch observer's ``state_dict()`` (tensors are converted with ``.numpy()``).
Other modules register their observers with :func:`register`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

from jax_observers._src import minmax, placeholder, recording
from jax_observers._src.base import Observer
from jax_observers._src.fixed import FixedQParamsObserver, FixedQParamsState
from jax_observers._src.per_channel import PerChannelMinMaxObserver


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


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def state_dict(observer: Observer, state) -> dict[str, np.ndarray]:
  """The observer's state as torch's ``state_dict()`` would hold it, as writable NumPy arrays."""
  return _to_dict(observer, state)


def load_state_dict(observer: Observer, d: Mapping, *, strict: bool = True, example=None):
  """The state stored in ``d`` (ours or torch's ``state_dict()``), checked against ``observer``.

  Args:
    observer: the config the state belongs to.
    d: a mapping of torch buffer names to arrays or torch tensors.
    strict: refuse unknown keys, an ``eps`` that differs from ``observer.eps`` (torch silently
      keeps the loaded one, or, through ``load_observer_state_dict``, resets it), and a NaN running
      range (torch's state after a NaN batch); with ``strict=False`` NaN entries load as never
      observed.
    example: an input example, for observers whose torch state holds no arrays (RecordingObserver).

  Raises:
    KeyError: a key the observer needs is missing.
    ValueError: unknown keys (strict), an eps mismatch (strict), or wrong shapes.
  """
  d = {k: _numpy(v) for k, v in d.items()}
  return _from_dict(observer, d, strict=strict, example=example)


def take(d: dict, keys: tuple[str, ...], observer, strict: bool) -> list[np.ndarray]:
  """The values of ``keys``; a missing key is a KeyError, an unknown one (strict) a ValueError."""
  missing = [k for k in keys if k not in d]
  if missing:
    raise KeyError(f"{type(observer).__name__} state_dict is missing {missing}; got {sorted(d)}.")
  extra = sorted(set(d) - set(keys))
  if strict and extra:
    raise ValueError(f"{type(observer).__name__} state_dict has unexpected keys {extra}.")
  return [d[k] for k in keys]


def check_eps(eps: np.ndarray, observer, strict: bool) -> None:
  """Under ``strict``, a ValueError when the stored ``eps`` is not the observer's."""
  stored = float(np.asarray(eps).reshape(-1)[0])
  if strict and np.float32(stored) != np.float32(observer.eps):
    raise ValueError(
      f"state_dict eps={stored!r} differs from the observer's eps={observer.eps!r}; build the "
      "observer with that eps or pass strict=False."
    )


def _minmax_to_dict(observer, state) -> dict[str, np.ndarray]:
  min_val = np.array(state.min_val, np.float32)
  max_val = np.array(state.max_val, np.float32)
  fresh = min_val.ndim == 1 and np.all(min_val == np.inf) and np.all(max_val == -np.inf)
  if fresh:  # torch's per-channel observers start from empty [0] buffers.
    min_val, max_val = np.zeros(0, np.float32), np.zeros(0, np.float32)
  return {"eps": np.array([observer.eps], np.float32), "min_val": min_val, "max_val": max_val}


def _minmax_from_dict(observer, d, *, strict, example):
  eps, min_val, max_val = take(d, ("eps", "min_val", "max_val"), observer, strict)
  check_eps(eps, observer, strict)
  per_channel = isinstance(observer, PerChannelMinMaxObserver)
  for name, value in (("min_val", min_val), ("max_val", max_val)):
    if (value.ndim != 1) if per_channel else (value.size != 1):
      raise ValueError(
        f"{type(observer).__name__} expects {name} of shape {'(C,)' if per_channel else '()'}, "
        f"got {value.shape}."
      )
  if min_val.shape != max_val.shape:
    raise ValueError(f"min_val {min_val.shape} and max_val {max_val.shape} differ in shape.")
  min_val, max_val = _without_nan(min_val, max_val, strict)
  shape = min_val.shape if per_channel else ()
  return minmax.MinMaxState(
    min_val=np.asarray(min_val, np.float32).reshape(shape),
    max_val=np.asarray(max_val, np.float32).reshape(shape),
  )


def _without_nan(min_val, max_val, strict: bool):
  """torch's running min/max turn NaN for good once an observed batch held a NaN."""
  nan = np.isnan(min_val) | np.isnan(max_val)
  if not nan.any():
    return min_val, max_val
  if strict:
    raise ValueError(
      f"min_val/max_val hold NaN in {int(nan.sum())} place(s): the torch observer saw NaN data and "
      "its running range is poisoned. Pass strict=False to load those entries as never observed."
    )
  return np.where(nan, np.inf, min_val), np.where(nan, -np.inf, max_val)


def _fixed_to_dict(observer, state) -> dict[str, np.ndarray]:
  return {
    "scale": np.array(state.scale, np.float32).reshape(1),
    "zero_point": np.array(state.zero_point, np.int32).reshape(1),
  }


def _fixed_from_dict(observer, d, *, strict, example):
  scale, zero_point = take(d, ("scale", "zero_point"), observer, strict)
  return FixedQParamsState(
    scale=np.asarray(scale, np.float32).reshape(()),
    zero_point=np.asarray(zero_point, np.int32).reshape(()),
  )


def _empty_to_dict(observer, state) -> dict[str, np.ndarray]:
  return {}


def _empty_from_dict(observer, d, *, strict, example):
  take(d, (), observer, strict)
  return placeholder.EmptyState()


def _recording_to_dict(observer, state) -> dict[str, np.ndarray]:
  return {"tensor_val": np.array(state.tensor_val), "count": np.array(state.count, np.int32)}


def _recording_from_dict(observer, d, *, strict, example):
  if not d:  # torch keeps the recorded list outside its state_dict.
    if example is None:
      raise ValueError("torch's RecordingObserver state_dict is empty; pass example= to init.")
    return observer.init(example)
  tensor_val, count = take(d, ("tensor_val", "count"), observer, strict)
  return recording.RecordingState(tensor_val=tensor_val, count=np.asarray(count, np.int32))


register(minmax.MinMaxObserver, _minmax_to_dict, _minmax_from_dict)
register(FixedQParamsObserver, _fixed_to_dict, _fixed_from_dict)
register(placeholder._Stateless, _empty_to_dict, _empty_from_dict)
register(recording.RecordingObserver, _recording_to_dict, _recording_from_dict)
