"""Flax NNX modules whose observer state is an :class:`ObserverVariable` (collection ``'observers'``).

``nnx.state(model, jo.nnx.ObserverVariable)`` selects every observer state of a model, so it can be
saved, synced or reset on its own; ``nnx.split(model, jo.nnx.ObserverVariable, ...)`` keeps it out of
the optimizer's parameters. Observing is switched per module (``observing``) or for a whole model
with :func:`disable_observer` / :func:`enable_observer`.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jax_observers as jo
  >>> obs = jo.nnx.Observe(jo.MinMaxObserver(), jnp.zeros(3))
  >>> _ = obs(jnp.array([-1.0, 2.0, 0.5]))
  >>> nnx.state(obs, jo.nnx.ObserverVariable)["state"].get_value().max_val
  Array(2., dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_observers._src import fake_quant_state
from jax_observers._src.base import QParamsUnavailableError
from jax_observers._src.learnable import LearnableFakeQuantize


class ObserverVariable(nnx.Variable):
  """Holds an observer's (or fake quant's) state pytree; registered under the name ``'observers'``."""


nnx.register_variable_name("observers", ObserverVariable)


class Observe(nnx.Module):
  """Observes its input with ``observer`` and returns the input unchanged.

  Args:
    observer: any observer config.
    example: an input example (only its shape and dtype are used) to size the state.
    axis_name: a mapped axis to reduce the batch statistic over (``shard_map``, ``pmap``, ``vmap``).
    observing: update the statistics on each call (switch with :func:`disable_observer`).
  """

  def __init__(self, observer: Any, example, *, axis_name=None, observing: bool = True):
    self.observer = observer
    self.state = ObserverVariable(observer.init(example))
    self.axis_name = axis_name
    self.observing = observing

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.observing:
      new = self.observer.update(
        self.state.get_value(), jax.lax.stop_gradient(x), axis_name=self.axis_name
      )
      self.state.set_value(new)
    return x

  def calculate_qparams(self):
    return self.observer.calculate_qparams(self.state.get_value())


class FakeQuant(nnx.Module):
  """Fake-quantizes its input with ``config`` (``jo.FakeQuantize``, fused, fixed or learnable).

  The fake-quant state is an :class:`ObserverVariable`; for ``jo.LearnableFakeQuantize`` (LSQ) the
  ``scale`` and ``zero_point`` are ``nnx.Param`` so optimizers train them, and the forward writes
  back torch's in-place updates (the observed qparams while static, the eps clamp otherwise).

  Args:
    config: a fake-quant config.
    example: an input example (shape and dtype) to size the state.
    axis_name: a mapped axis to sync the observer's batch statistic over.
  """

  def __init__(self, config: Any, example, *, axis_name=None):
    state = config.init(example)
    self.config = config
    self.learnable = isinstance(config, LearnableFakeQuantize)
    if self.learnable:
      self.scale = nnx.Param(state.scale)
      self.zero_point = nnx.Param(state.zero_point)
    self.state = ObserverVariable(state)
    self.axis_name = axis_name

  def __call__(self, x: jax.Array) -> jax.Array:
    state = self.state.get_value()
    if self.learnable:
      state = state.replace(scale=self.scale.get_value(), zero_point=self.zero_point.get_value())
    y, new_state = self.config.apply(state, x, axis_name=self.axis_name)
    if self.learnable:
      self.scale.set_value(new_state.scale)
      self.zero_point.set_value(new_state.zero_point)
    self.state.set_value(new_state)
    return y

  def calculate_qparams(self):
    state = self.state.get_value()
    if self.learnable:
      state = state.replace(scale=self.scale.get_value(), zero_point=self.zero_point.get_value())
    return self.config.calculate_qparams(state)


def _modules(model: nnx.Module):
  for path, module in nnx.iter_modules(model):
    if hasattr(module, "calculate_qparams") and isinstance(
      getattr(module, "state", None), ObserverVariable
    ):
      yield path, module


def calculate_qparams(model: nnx.Module) -> dict[str, Any]:
  """The QParams of every observer in ``model``, keyed by the module path joined with ``/``."""
  out = {}
  for path, module in _modules(model):
    try:
      out["/".join(map(str, path))] = module.calculate_qparams()
    except QParamsUnavailableError:
      continue
  return out


def enable_observer(model: nnx.Module, enabled: bool = True) -> None:
  """Switches statistics updates on (or off) in every observer and fake-quant module, in place."""
  for _, module in _modules(model):
    if isinstance(module, FakeQuant):
      module.state.set_value(fake_quant_state.enable_observer(module.state.get_value(), enabled))
    else:
      module.observing = enabled


def disable_observer(model: nnx.Module) -> None:
  """Freezes the statistics of every observer module of ``model``, in place."""
  enable_observer(model, False)


def enable_fake_quant(model: nnx.Module, enabled: bool = True) -> None:
  """Switches fake quantization on (or off) in every fake-quant module of ``model``, in place."""
  _map_fake_quant(model, lambda state: fake_quant_state.enable_fake_quant(state, enabled))


def disable_fake_quant(model: nnx.Module) -> None:
  """Makes every fake-quant module of ``model`` pass its input through, in place."""
  enable_fake_quant(model, False)


def _map_fake_quant(model: nnx.Module, fn) -> None:
  for _, module in _modules(model):
    if isinstance(module, FakeQuant):
      module.state.set_value(fn(module.state.get_value()))


def enable_param_learning(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` learns its scale/zero_point (observer off), in place."""
  _map_fake_quant(model, fake_quant_state.enable_param_learning)


def enable_static_estimate(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` takes scale/zero_point from its observer, in place."""
  _map_fake_quant(model, fake_quant_state.enable_static_estimate)


def enable_static_observation(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` only observes (output = input), in place."""
  _map_fake_quant(model, fake_quant_state.enable_static_observation)
