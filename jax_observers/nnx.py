"""Flax NNX modules whose observer state is an :class:`ObserverVariable` (collection ``'observers'``).

``nnx.state(model, jo.nnx.ObserverVariable)`` selects every observer state of a model, so it can be
saved, synced or reset on its own; ``nnx.split(model, jo.nnx.ObserverVariable, ...)`` keeps it out of
the optimizer's parameters. Observing is switched per module (``observing``) or for a whole model
with :func:`disable_observer` / :func:`enable_observer`; :func:`calibrate` runs a jitted loop over
batches. After calibration ``model.set_attributes(quantize=True)`` (or ``model.eval(quantize=True)``,
as nnx's BatchNorm follows ``use_running_average``) makes every :class:`Observe` fake-quantize with
the qparams of its state instead of observing.

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

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_observers._src import calibration, stacked
from jax_observers._src.base import QParamsUnavailableError
from jax_observers._src.config import resolve_config
from jax_observers._src.fake_quant import state as fake_quant_state


class ObserverVariable(nnx.Variable):
  """Holds an observer's (or fake quant's) state pytree; registered under the name ``'observers'``."""


nnx.register_variable_name("observers", ObserverVariable)


class _Quantizer(nnx.Module):
  """An observer or fake-quant module: a config, its :class:`ObserverVariable` and the input spec.

  ``spec`` is the shape and dtype of one call's input, so that :func:`calculate_qparams` can tell
  the stacked axes of an ``nnx.vmap``/``nnx.scan`` stack from the state's own.
  """

  def _setup(self, config, example, arg: str):
    config = resolve_config(config, arg=arg)
    example = example if hasattr(example, "shape") else jnp.asarray(example)
    self.spec = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    return config, config.init(example)

  def enable_observer(self, enabled: bool = True) -> None:
    """Switches statistics updates on or off."""
    raise NotImplementedError

  def map_fake_quant_state(self, fn) -> None:
    """Applies ``fn`` to a fake-quant state (nothing for a plain observer)."""

  def current_state(self):
    return self.state.get_value()


class Observe(_Quantizer):
  """Observes its input with ``observer`` and returns it unchanged, or fake-quantized once calibrated.

  Args:
    observer: an observer config, its class, or a ``with_args`` partial (called once).
    example: an input example (only its shape and dtype are used) to size the state.
    axis_name: a mapped axis to reduce the batch statistic over (``shard_map``, ``pmap``, ``vmap``).
    observing: update the statistics on each call (switch with :func:`disable_observer`).
    quantize: fake-quantize the input with the qparams of the current state and observe nothing
      (evaluation after calibration); set it for a whole model with
      ``model.set_attributes(quantize=True)``.
  """

  def __init__(
    self, observer: Any, example, *, axis_name=None, observing: bool = True, quantize: bool = False
  ):
    self.observer, state = self._setup(observer, example, "observer")
    self.state = ObserverVariable(state)
    self.axis_name = axis_name
    self.observing = observing
    self.quantize = quantize

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.quantize:
      return self.observer.fake_quantize(x, self.calculate_qparams())
    if self.observing:
      new = self.observer.update(
        self.state.get_value(), jax.lax.stop_gradient(x), axis_name=self.axis_name
      )
      self.state.set_value(new)
    return x

  @property
  def config(self):
    return self.observer

  def enable_observer(self, enabled: bool = True) -> None:
    self.observing = enabled

  def calculate_qparams(self):
    return self.observer.calculate_qparams(self.state.get_value())


class FakeQuant(_Quantizer):
  """Fake-quantizes its input with ``config`` (``jo.FakeQuantize``, fused, fixed or learnable).

  The fake-quant state is an :class:`ObserverVariable`; the config's ``trainable_fields`` (LSQ's
  ``scale`` and ``zero_point`` for ``jo.LearnableFakeQuantize``) are ``nnx.Param`` so optimizers
  train them, and the forward writes back torch's in-place updates (the observed qparams while
  static, the eps clamp otherwise).

  Args:
    config: a fake-quant config, its class, or a ``with_args`` partial.
    example: an input example (shape and dtype) to size the state.
    axis_name: a mapped axis to sync the observer's batch statistic over.
  """

  def __init__(self, config: Any, example, *, axis_name=None):
    self.config, state = self._setup(config, example, "config")
    for name in self.config.trainable_fields:
      setattr(self, name, nnx.Param(getattr(state, name)))
    self.state = ObserverVariable(state)
    self.axis_name = axis_name

  def current_state(self):
    params = {n: getattr(self, n).get_value() for n in self.config.trainable_fields}
    return self.state.get_value().replace(**params)

  def __call__(self, x: jax.Array) -> jax.Array:
    y, new_state = self.config.apply(self.current_state(), x, axis_name=self.axis_name)
    for name in self.config.trainable_fields:
      getattr(self, name).set_value(getattr(new_state, name))
    self.state.set_value(new_state)
    return y

  def enable_observer(self, enabled: bool = True) -> None:
    self.map_fake_quant_state(lambda state: fake_quant_state.enable_observer(state, enabled))

  def map_fake_quant_state(self, fn) -> None:
    self.state.set_value(fn(self.state.get_value()))

  def calculate_qparams(self):
    return self.config.calculate_qparams(self.current_state())


def _modules(model: nnx.Module):
  for path, module in nnx.iter_modules(model):
    if isinstance(module, _Quantizer):
      yield path, module


def calculate_qparams(model: nnx.Module) -> dict[str, Any]:
  """The QParams of every observer in ``model``, keyed by the module path joined with ``/``.

  Modules stacked by ``nnx.vmap``/``nnx.scan`` get their qparams stacked the same way. Observers
  without qparams (``PlaceholderObserver``, ...) are left out.
  """
  out = {}
  for path, module in _modules(model):
    name = "/".join(map(str, path))
    try:
      out[name] = stacked.calculate_qparams(
        module.config, module.current_state(), module.spec, name
      )
    except QParamsUnavailableError:
      continue
  return out


def calibrate(model: nnx.Module, batches: Iterable, *, progress: bool | str = False) -> nnx.Module:
  """Runs ``model(batch)`` under ``nnx.jit`` over ``batches`` (a tuple is passed as positional
  arguments), updating every observer in place; returns ``model``.

  Raises:
    ValueError: the model has no observer, ``batches`` is empty, or no observer state changed
      (observers disabled or in quantize mode, ...).
  """
  if not any(True for _ in _modules(model)):
    raise ValueError(f"{type(model).__name__} holds no jo.nnx.Observe or FakeQuant module.")
  jitted = nnx.jit(lambda m, args: m(*args))
  calibration.run(
    lambda args: jitted(model, args),
    batches,
    states=lambda: jax.tree.map(lambda a: a, nnx.state(model, ObserverVariable)),
    progress=progress,
    name=type(model).__name__,
    disable_hint="jo.nnx.disable_observer",
  )
  return model


def enable_observer(model: nnx.Module, enabled: bool = True) -> None:
  """Switches statistics updates on (or off) in every observer and fake-quant module, in place."""
  for _, module in _modules(model):
    module.enable_observer(enabled)


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
    module.map_fake_quant_state(fn)


def enable_param_learning(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` learns its scale/zero_point (observer off), in place."""
  _map_fake_quant(model, fake_quant_state.enable_param_learning)


def enable_static_estimate(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` takes scale/zero_point from its observer, in place."""
  _map_fake_quant(model, fake_quant_state.enable_static_estimate)


def enable_static_observation(model: nnx.Module) -> None:
  """Every LSQ module of ``model`` only observes (output = input, no learning), in place."""
  _map_fake_quant(model, fake_quant_state.enable_static_observation)
