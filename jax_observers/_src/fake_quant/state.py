"""Fake-quant states and their flag toggles: per state (methods) and for whole pytrees (functions).

The flags are boolean arrays in the state, as torch keeps them in buffers (uint8 there), so toggling
them never recompiles a jitted step. The tree functions find every fake-quant state in any pytree (a
dict of states, a Flax variable collection, ...), like torch's ``model.apply(disable_observer)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jax_observers._src.readable import ReadableRepr


class FakeQuantStateMixin:
  """Flag setters shared by the fake-quant states; each returns a new state."""

  observer_flag = "observer_enabled"  # the learnable state observes under ``static_enabled``

  def _set(self, name: str, enabled):
    """The flag ``name`` set to ``enabled`` everywhere, keeping its shape (a stack of layers has one
    flag per layer), dtype and, for concrete flags, its sharding."""
    flag = getattr(self, name)
    new = jnp.full(jnp.shape(flag), enabled, jnp.bool_)
    if isinstance(flag, jax.Array) and not isinstance(flag, jax.core.Tracer):
      new = jax.device_put(new, flag.sharding)
    return self.replace(**{name: new})

  def enable_observer(self, enabled=True):
    return self._set(self.observer_flag, enabled)

  def disable_observer(self):
    return self.enable_observer(False)

  def enable_fake_quant(self, enabled=True):
    return self._set("fake_quant_enabled", enabled)

  def disable_fake_quant(self):
    return self.enable_fake_quant(False)


class FakeQuantizeState(FakeQuantStateMixin, ReadableRepr, struct.PyTreeNode, repr=False):
  """torch's ``FakeQuantize`` buffers; ``activation_post_process`` is the observer's state."""

  fake_quant_enabled: jax.Array  # shape (), bool; torch's uint8 [1] buffer.
  observer_enabled: jax.Array  # shape (), bool.
  scale: jax.Array  # shape () per tensor or (C,) per channel, float32; 1 before any observation.
  zero_point: jax.Array  # like scale; int32 (float32 for float qparams); 0 before any observation.
  activation_post_process: Any  # the observer's state pytree.


def _map_states(fn, tree):
  is_state = lambda node: isinstance(node, FakeQuantStateMixin)
  return jax.tree_util.tree_map(lambda n: fn(n) if is_state(n) else n, tree, is_leaf=is_state)


def enable_observer(tree, enabled=True):
  """Every fake-quant state in ``tree`` (a state, or any pytree holding states) with observing on.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> fq = jo.default_fake_quant()
    >>> states = {"conv": fq.init(jnp.zeros(3)), "fc": fq.init(jnp.zeros(3))}
    >>> [bool(s.observer_enabled) for s in jo.disable_observer(states).values()]
    [False, False]
  """
  return _map_states(lambda s: s.enable_observer(enabled), tree)


def disable_observer(tree):
  """Every fake-quant state in ``tree`` with observing off (torch's ``disable_observer``)."""
  return enable_observer(tree, False)


def enable_fake_quant(tree, enabled=True):
  """Every fake-quant state in ``tree`` with fake quantization on."""
  return _map_states(lambda s: s.enable_fake_quant(enabled), tree)


def disable_fake_quant(tree):
  """Every fake-quant state in ``tree`` with fake quantization off (the output is the input)."""
  return enable_fake_quant(tree, False)


class LearnableFakeQuantizeState(FakeQuantStateMixin, ReadableRepr, struct.PyTreeNode, repr=False):
  """torch's ``_LearnableFakeQuantize`` parameters and buffers."""

  scale: jax.Array  # shape () per tensor or (C,) per channel, float32; trainable.
  zero_point: jax.Array  # like scale, float32; trainable.
  fake_quant_enabled: jax.Array  # shape (), bool.
  static_enabled: jax.Array  # shape (), bool; the observer runs (torch's enable_observer sets it).
  learning_enabled: jax.Array  # shape (), bool; gradients reach scale and zero_point.
  activation_post_process: Any  # the observer's state pytree.

  observer_flag = "static_enabled"

  def toggle_qparam_learning(self, enabled=True):
    return self._set("learning_enabled", enabled)

  def enable_param_learning(self):
    """Learn scale/zero_point, fake-quantize, stop the observer."""
    return self.toggle_qparam_learning(True).enable_fake_quant(True).enable_observer(False)

  def enable_static_estimate(self):
    """Take scale/zero_point from the observer and fake-quantize; no learning."""
    return self.toggle_qparam_learning(False).enable_fake_quant(True).enable_observer(True)

  def enable_static_observation(self):
    """Only observe: the output is the input, no learning."""
    return self.toggle_qparam_learning(False).enable_fake_quant(False).enable_observer(True)


def _map_learnable(method: str, tree):
  is_state = lambda node: isinstance(node, LearnableFakeQuantizeState)
  return jax.tree_util.tree_map(
    lambda n: getattr(n, method)() if is_state(n) else n, tree, is_leaf=is_state
  )


def enable_param_learning(tree):
  """Every LSQ state in ``tree`` learning its scale/zero_point (observer off, fake quant on).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> fq = jo.LearnableFakeQuantize(observer=jo.MovingAverageMinMaxObserver)
    >>> states = jo.enable_param_learning({"a": fq.init(jnp.zeros(2)), "b": fq.init(jnp.zeros(2))})
    >>> [bool(s.learning_enabled) and not bool(s.static_enabled) for s in states.values()]
    [True, True]
  """
  return _map_learnable("enable_param_learning", tree)


def enable_static_estimate(tree):
  """Every LSQ state in ``tree`` taking scale/zero_point from its observer, fake quant on."""
  return _map_learnable("enable_static_estimate", tree)


def enable_static_observation(tree):
  """Every LSQ state in ``tree`` only observing (output = input, no learning)."""
  return _map_learnable("enable_static_observation", tree)
