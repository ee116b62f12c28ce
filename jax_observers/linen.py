"""Flax linen modules that keep observer state in the ``'observers'`` collection.

Calibration is ``model.apply(variables, x, mutable=["observers"])``: a module updates its state only
when that collection is mutable and never while the model initializes (as flax's BatchNorm and qwix
do), so plain ``model.apply(variables, x)`` is inference and leaves the statistics alone. The input
is observed through ``lax.stop_gradient``: observers never receive gradients.

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jax_observers as jo
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.Dense(4)(x)
  ...     return jo.linen.Observe(jo.MinMaxObserver(), name="act")(x)
  >>> x = jnp.ones((2, 3))
  >>> variables = Net().init(jax.random.key(0), x)
  >>> _, updated = Net().apply(variables, x, mutable=["observers"])
  >>> qparams = jo.linen.calculate_qparams(Net(), {**variables, **updated}, x)
  >>> sorted(qparams), qparams["act"].scale.dtype
  (['act'], dtype('float32'))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jax_observers._src.base import QParamsUnavailableError
from jax_observers._src.fake_quant_state import (
  disable_fake_quant,
  disable_observer,
  enable_fake_quant,
  enable_observer,
  enable_param_learning,
  enable_static_estimate,
  enable_static_observation,
)
from jax_observers._src.learnable import LearnableFakeQuantize

COLLECTION = "observers"
QPARAMS = "qparams"


def _updating(module: nn.Module) -> bool:
  return module.is_mutable_collection(COLLECTION) and not module.is_initializing()


def _sow_qparams(module: nn.Module, config, state) -> None:
  if module.is_mutable_collection(QPARAMS) and not module.is_initializing():
    try:
      qparams = config.calculate_qparams(state)
    except QParamsUnavailableError:
      return
    module.put_variable(QPARAMS, "qparams", qparams)


class Observe(nn.Module):
  """Observes its input with ``observer`` and returns the input unchanged.

  Attributes:
    observer: any observer config (``jo.MinMaxObserver(...)``, a histogram observer, ...).
    axis_name: a mapped axis (``shard_map``/``pmap``/``nn.vmap``) to reduce the batch statistic over,
      so that every device keeps the state of the global batch.
  """

  observer: Any
  axis_name: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    state = self.variable(COLLECTION, "state", self.observer.init, x)
    if _updating(self):
      state.value = self.observer.update(
        state.value, jax.lax.stop_gradient(x), axis_name=self.axis_name
      )
    _sow_qparams(self, self.observer, state.value)
    return x


class FakeQuant(nn.Module):
  """Fake-quantizes its input with ``config`` (``jo.FakeQuantize``, fused, fixed or learnable).

  The fake-quant state (observer state, ``scale``/``zero_point`` buffers, the enable flags) lives in
  ``'observers'``. When that collection is immutable (inference, or training with frozen ranges) the
  stored qparams are used and nothing is observed. Gradients reach ``x`` through torch's
  straight-through mask. Toggle a whole model with ``jo.disable_observer(variables)``,
  ``jo.disable_fake_quant(variables)`` and friends (re-exported here).

  For ``jo.LearnableFakeQuantize`` (LSQ), ``scale`` and ``zero_point`` are ``'params'`` so the
  optimizer trains them; while the state's ``static_enabled`` flag is on (calibration), apply with
  ``mutable=["observers", "params"]`` so the observed qparams are written into those params.

  Attributes:
    config: a fake-quant config.
    axis_name: a mapped axis to sync the observer's batch statistic over.
  """

  config: Any
  axis_name: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    state_var = self.variable(COLLECTION, "state", self.config.init, x)
    state = state_var.value
    learnable = isinstance(self.config, LearnableFakeQuantize)
    if learnable:
      scale = self.param("scale", lambda _: state.scale)
      zero_point = self.param("zero_point", lambda _: state.zero_point)
      state = state.replace(scale=scale, zero_point=zero_point)
    if self.is_initializing():  # the variables exist now; skip tracing the fake quant itself
      return x
    updating = _updating(self)
    if not updating:
      state = disable_observer(state)
    y, new_state = self.config.apply(state, x, axis_name=self.axis_name)
    if updating:
      if learnable and self.is_mutable_collection("params"):
        self.put_variable("params", "scale", new_state.scale)
        self.put_variable("params", "zero_point", new_state.zero_point)
      state_var.value = new_state
    _sow_qparams(self, self.config, new_state)
    return y


def calculate_qparams(model: nn.Module, variables, *args, **kwargs) -> dict:
  """The QParams of every observer in ``model``, keyed by module path (a nested dict).

  Runs ``model.apply(variables, *args, **kwargs)`` once without touching the statistics.
  """
  _, out = model.apply(variables, *args, mutable=[QPARAMS], **kwargs)
  return _strip(dict(out.get(QPARAMS, {})))


__all__ = [
  "COLLECTION",
  "FakeQuant",
  "Observe",
  "calculate_qparams",
  "disable_fake_quant",
  "disable_observer",
  "enable_fake_quant",
  "enable_observer",
  "enable_param_learning",
  "enable_static_estimate",
  "enable_static_observation",
]


def _strip(tree):
  """Drops the ``"qparams"`` variable-name level: {"act": {"qparams": qp}} -> {"act": qp}."""
  if isinstance(tree, dict):
    if set(tree) == {"qparams"} and not isinstance(tree["qparams"], dict):
      return tree["qparams"]
    return {k: _strip(v) for k, v in tree.items()}
  return tree
