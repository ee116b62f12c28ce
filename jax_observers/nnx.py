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

from jax_observers._src.base import QParamsUnavailableError


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
  """Switches statistics updates on (or off) in every observer module of ``model``, in place."""
  for _, module in _modules(model):
    module.observing = enabled


def disable_observer(model: nnx.Module) -> None:
  """Freezes the statistics of every observer module of ``model``, in place."""
  enable_observer(model, False)
