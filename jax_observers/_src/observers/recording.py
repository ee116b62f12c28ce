"""``RecordingObserver``: keeps the last ``capacity`` observed arrays in a fixed-size ring buffer.

torch appends every tensor to a Python list; a jit-compiled pure function cannot grow, so the state is
a ``[capacity, *shape]`` buffer plus a count, and :meth:`RecordingObserver.get_tensor_value` returns
the recorded arrays oldest first, like torch's list.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jax_observers._src import serialization
from jax_observers._src.base import Observer, canonical_dtype, check_state
from jax_observers._src.readable import ReadableRepr

_INT32_MAX = np.iinfo(np.int32).max


class RecordingState(ReadableRepr, struct.PyTreeNode, repr=False):
  tensor_val: (
    jax.Array
  )  # shape (capacity, *x.shape), the input dtype; slot count % capacity is next.
  count: jax.Array  # shape (), int32; arrays recorded so far, saturating at 2**31 - 1.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingObserver(Observer):
  """Records the observed arrays (for debugging), at most ``capacity`` of the newest.

  With ``axis_name`` it records the global batch: the shards gathered along axis 0, so ``init``
  takes an example of the global shape.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.RecordingObserver(capacity=2)
    >>> state = obs.init(jnp.zeros(2))
    >>> for i in range(3):
    ...   state = obs.update(state, jnp.full(2, float(i)))
    >>> [a.tolist() for a in obs.get_tensor_value(state)]
    [[1.0, 1.0], [2.0, 2.0]]
  """

  dtype: Any = jnp.uint8
  capacity: int = 16

  def __post_init__(self):
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
    if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
      raise ValueError(f"capacity={self.capacity!r} must be a positive int.")

  def init(self, x) -> RecordingState:
    shape, dtype = jnp.shape(x), getattr(x, "dtype", jnp.result_type(x))
    return RecordingState(
      tensor_val=jnp.zeros((self.capacity, *shape), dtype), count=jnp.zeros((), jnp.int32)
    )

  def update(self, state: RecordingState, x, *, axis_name=None) -> RecordingState:
    x = jnp.asarray(lax.stop_gradient(x))
    check_state(self, state, RecordingState, "update", {"count": ((), jnp.int32)})
    if axis_name is not None:
      x = lax.all_gather(x, axis_name, axis=0, tiled=True)
    expected = state.tensor_val.shape[1:]
    if x.shape != expected:
      raise ValueError(
        f"RecordingObserver was initialised for arrays of shape {expected}; got x of shape "
        f"{x.shape}."
      )
    slot = state.count % self.capacity
    return RecordingState(
      tensor_val=state.tensor_val.at[slot].set(x.astype(state.tensor_val.dtype)),
      count=jnp.minimum(state.count, _INT32_MAX - 1) + 1,
    )

  def get_tensor_value(self, state: RecordingState) -> list[np.ndarray]:
    """The recorded arrays on the host, oldest first (torch's ``get_tensor_value``)."""
    count = int(state.count)
    kept = min(count, self.capacity)
    order = [(count - kept + i) % self.capacity for i in range(kept)]
    values = np.asarray(state.tensor_val)
    return [values[i] for i in order]


def _recording_to_dict(observer, state) -> dict[str, np.ndarray]:
  """torch's: empty (its recorded list is no buffer), so torch's strict load accepts it. The
  recording itself is kept by Flax serialization of the state, not by the state dict."""
  return {}


def _recording_from_dict(observer, d, *, strict, example):
  if not {"tensor_val", "count"} & set(d):
    # torch keeps the recorded list outside its state_dict, and so does state_dict().
    serialization.take(d, (), observer, strict)
    if example is None:
      raise ValueError(
        "RecordingObserver's state_dict is empty (as torch's); pass example= to init."
      )
    return observer.init(example)
  # the keys of jax_observers < 0.2, which recorded into the state dict
  tensor_val, count = serialization.take(d, ("tensor_val", "count"), observer, strict)
  if tensor_val.ndim < 1 or tensor_val.shape[0] != observer.capacity:
    serialization.refuse(
      observer, "tensor_val", tensor_val, f"expected [capacity={observer.capacity}, ...]"
    )
  count = serialization.checked(
    observer, "count", count, kind="count", shapes=[(), (1,)], nonnegative=True
  )
  return RecordingState(tensor_val=tensor_val, count=count.reshape(()))


serialization.register(RecordingObserver, _recording_to_dict, _recording_from_dict)
