"""torch ``state_dict()`` layouts of the fake-quant modules (registered by their config modules).

``FakeQuantize`` (and ``FixedQParamsFakeQuantize``, ``FusedMovingAvgObsFakeQuantize``)::

  fake_quant_enabled [1] uint8 (int64 when fused), observer_enabled [1], scale [1] or [C] float32,
  zero_point [1] or [C] int32 (float32 for float qparams), activation_post_process.<observer keys>

``LearnableFakeQuantize``: ``scale``/``zero_point`` float32 [1] or [C], the uint8 [1] flags
``fake_quant_enabled``, ``observer_enabled`` (unused by torch, written as 1), ``static_enabled``,
``learning_enabled``, ``eps`` [1] float32, then ``activation_post_process.*``.

Loading follows torch: a flag is on when it equals 1 (fused: when it is nonzero). A per-channel module
that never observed has ``scale`` [1] and empty observer buffers in torch; loading it needs
``example=`` (an input) to know the channel count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import serialization
from jax_observers._src.fake_quant.state import FakeQuantizeState, LearnableFakeQuantizeState

PREFIX = "activation_post_process."


def _flag_array(value, dtype=np.uint8) -> np.ndarray:
  return np.array([int(bool(value))], dtype)


def _split(fq, d: dict, own: tuple[str, ...], strict: bool):
  """``(own values, child dict)``; a missing own key is a KeyError, an unknown one (strict) a ValueError."""
  child = {k[len(PREFIX) :]: v for k, v in d.items() if k.startswith(PREFIX)}
  mine = {k: v for k, v in d.items() if not k.startswith(PREFIX)}
  return serialization.take(mine, own, fq, strict), child


def _observer_state(fq, child: dict, strict: bool, example, per_channel: bool):
  """``(observer state, channel count or None)``; a never-observed per-channel state is rebuilt."""
  obs = fq.activation_post_process
  state = serialization.load_state_dict(obs, child, strict=strict, example=example)
  if not per_channel:
    return jax.tree_util.tree_map(jnp.asarray, state), None
  sizes = [np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(state) if np.ndim(leaf)]
  if 0 in sizes:
    if example is None:
      raise ValueError(
        f"{type(fq).__name__} state_dict comes from a per-channel module that never observed; "
        "pass example= (an input) so the channel count is known."
      )
    state, sizes = obs.init(example), []
  channels = max(sizes) if sizes else None
  return jax.tree_util.tree_map(jnp.asarray, state), channels


def _qparam(fq, name, value, channels, per_channel: bool, dtype, strict: bool) -> jax.Array:
  """``scale``/``zero_point`` validated (:func:`state_dict.checked`) and shaped for the state."""
  integer = jnp.issubdtype(dtype, jnp.integer)
  value = serialization.checked(fq, name, value, kind="int" if integer else "float")
  if strict and not integer and np.isnan(value).any():
    serialization.refuse(fq, name, value, "NaN (the module saw NaN data); pass strict=False")
  value = value.reshape(-1)
  if not per_channel:
    if value.size != 1:
      serialization.refuse(fq, name, value, "expected one value: the module is per tensor")
    return jnp.asarray(value.reshape(()), dtype)
  if value.size not in (1, channels):
    serialization.refuse(fq, name, value, f"expected 1 or {channels} values, one per channel")
  return jnp.asarray(np.broadcast_to(value, (channels,)), dtype)


def _flag(fq, name, value, nonzero: bool = False) -> jax.Array:
  """torch's test of a flag buffer: ``flag[0] == 1`` (``FakeQuantize``) or ``!= 0`` (fused)."""
  value = serialization.checked(fq, name, value, kind="flag")
  first = value.reshape(-1)[0]
  return jnp.asarray(bool(first != 0) if nonzero else bool(first == 1))


def _channels(fq, scale, observed, example) -> int:
  """The channel count: from the scale, the observer buffers, or the example input."""
  if scale.size > 1:
    return scale.size
  if observed is not None:
    return observed
  if example is not None:
    return np.shape(example)[fq.ch_axis]
  return 1


def _child_dict(fq, state) -> dict[str, np.ndarray]:
  child = serialization.state_dict(fq.activation_post_process, state.activation_post_process)
  return {PREFIX + k: v for k, v in child.items()}


def fake_quantize_to_dict(fq, state) -> dict[str, np.ndarray]:
  return {
    "fake_quant_enabled": _flag_array(state.fake_quant_enabled, fq.torch_flag_dtype),
    "observer_enabled": _flag_array(state.observer_enabled, fq.torch_flag_dtype),
    "scale": np.array(state.scale, np.float32).reshape(-1),
    "zero_point": np.array(state.zero_point, fq.zero_point_dtype()).reshape(-1),
    **_child_dict(fq, state),
  }


def fake_quantize_from_dict(fq, d, *, strict, example):
  own = ("fake_quant_enabled", "observer_enabled", "scale", "zero_point")
  (fake_quant, observer, scale, zero_point), child = _split(fq, d, own, strict)
  obs_state, observed = _observer_state(fq, child, strict, example, fq.is_per_channel)
  channels = _channels(fq, scale, observed, example)
  nonzero = fq.torch_flag_dtype == np.int64  # the fused kernel tests `if (flag.item().toInt())`
  per_channel = fq.is_per_channel
  zp_dtype = fq.zero_point_dtype()
  return FakeQuantizeState(
    fake_quant_enabled=_flag(fq, "fake_quant_enabled", fake_quant, nonzero),
    observer_enabled=_flag(fq, "observer_enabled", observer, nonzero),
    scale=_qparam(fq, "scale", scale, channels, per_channel, jnp.float32, strict),
    zero_point=_qparam(fq, "zero_point", zero_point, channels, per_channel, zp_dtype, strict),
    activation_post_process=obs_state,
  )


_LEARNABLE_KEYS = (
  "scale",
  "zero_point",
  "fake_quant_enabled",
  "observer_enabled",
  "static_enabled",
  "learning_enabled",
  "eps",
)


def learnable_to_dict(fq, state) -> dict[str, np.ndarray]:
  return {
    "scale": np.array(state.scale, np.float32).reshape(-1),
    "zero_point": np.array(state.zero_point, np.float32).reshape(-1),
    "fake_quant_enabled": _flag_array(state.fake_quant_enabled),
    "observer_enabled": _flag_array(True),
    "static_enabled": _flag_array(state.static_enabled),
    "learning_enabled": _flag_array(state.learning_enabled),
    "eps": np.array([fq.eps], np.float32),
    **_child_dict(fq, state),
  }


def learnable_from_dict(fq, d, *, strict, example):
  values, child = _split(fq, d, _LEARNABLE_KEYS, strict)
  scale, zero_point, fake_quant, observer, static, learning, eps = values
  serialization.check_eps(eps, fq, strict)
  _flag(fq, "observer_enabled", observer)  # validated; torch does not use it
  per_channel = fq.qscheme.is_per_channel
  obs_state, observed = _observer_state(fq, child, strict, example, per_channel)
  channels = _channels(fq, scale, observed, example)
  return LearnableFakeQuantizeState(
    scale=_qparam(fq, "scale", scale, channels, per_channel, jnp.float32, strict),
    zero_point=_qparam(fq, "zero_point", zero_point, channels, per_channel, jnp.float32, strict),
    fake_quant_enabled=_flag(fq, "fake_quant_enabled", fake_quant),
    static_enabled=_flag(fq, "static_enabled", static),
    learning_enabled=_flag(fq, "learning_enabled", learning),
    activation_post_process=obs_state,
  )
