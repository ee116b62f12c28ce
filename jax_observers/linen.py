"""Flax linen modules that keep observer state in the ``'observers'`` collection.

Calibration is ``model.apply(variables, x, mutable=["observers"])`` (or :func:`calibrate` over an
iterable of batches): a module updates its state only when that collection is mutable and never
while the model initializes (as flax's BatchNorm and qwix do), so plain ``model.apply(variables, x)``
is inference and leaves the statistics alone. The input is observed through ``lax.stop_gradient``:
observers never receive gradients. After calibration, ``Observe(..., quantize=True)`` (or the call
argument ``quantize=True``, as BatchNorm's ``use_running_average``) fake-quantizes with the qparams
of its state instead of observing, which is how a calibrated model is evaluated.

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jax_observers as jo
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, quantize=False):
  ...     x = nn.Dense(4)(x)
  ...     return jo.linen.Observe(jo.MinMaxObserver(), name="act")(x, quantize=quantize)
  >>> x = jnp.ones((2, 3))
  >>> variables = Net().init(jax.random.key(0), x)
  >>> variables = jo.linen.calibrate(Net(), variables, [x, 2 * x])
  >>> qparams = jo.linen.calculate_qparams(Net(), variables, x)
  >>> sorted(qparams), qparams["act"].scale.dtype
  (['act'], dtype('float32'))
  >>> y = Net().apply(variables, x, quantize=True)  # evaluate the calibrated model
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jax_observers._src import calibration, stacked
from jax_observers._src.base import QParamsUnavailableError
from jax_observers._src.config import resolve_config
from jax_observers._src.fake_quant.state import (
  disable_fake_quant,
  disable_observer,
  enable_fake_quant,
  enable_observer,
  enable_param_learning,
  enable_static_estimate,
  enable_static_observation,
)

COLLECTION = "observers"


def _updating(module: nn.Module) -> bool:
  return module.is_mutable_collection(COLLECTION) and not module.is_initializing()


class _Quantizer(nn.Module):
  """What :func:`calculate_qparams` looks for: a config and its state at ``'observers'/state``."""

  config_field = ""  # the attribute holding the config

  def __post_init__(self):
    config = resolve_config(self.quantizer_config(), arg=self.config_field)
    object.__setattr__(self, self.config_field, config)
    super().__post_init__()

  def quantizer_config(self):
    return getattr(self, self.config_field)


class Observe(_Quantizer):
  """Observes its input with ``observer`` and returns it unchanged, or fake-quantized once calibrated.

  Attributes:
    observer: an observer config (``jo.MinMaxObserver(...)``), its class, or a ``with_args``
      partial (called once, as torch calls ``qconfig.activation()``).
    axis_name: a mapped axis (``shard_map``/``pmap``/``nn.vmap``) to reduce the batch statistic over,
      so that every device keeps the state of the global batch.
    quantize: False (default) observes when ``'observers'`` is mutable; True fake-quantizes the
      input with the qparams of the current state and observes nothing (evaluation after
      calibration). ``__call__(x, quantize=...)`` overrides it for one call.
  """

  observer: Any
  axis_name: Any = None
  quantize: bool = False

  config_field = "observer"

  @nn.compact
  def __call__(self, x: jax.Array, quantize: bool | None = None) -> jax.Array:
    quantize = self.quantize if quantize is None else quantize
    state = self.variable(COLLECTION, "state", self.observer.init, x)
    if quantize:
      if self.is_initializing():
        return x
      return self.observer.fake_quantize(x, self.observer.calculate_qparams(state.value))
    if _updating(self):
      state.value = self.observer.update(
        state.value, jax.lax.stop_gradient(x), axis_name=self.axis_name
      )
    return x


class FakeQuant(_Quantizer):
  """Fake-quantizes its input with ``config`` (``jo.FakeQuantize``, fused, fixed or learnable).

  The fake-quant state (observer state, ``scale``/``zero_point`` buffers, the enable flags) lives in
  ``'observers'``. When that collection is immutable (inference, or training with frozen ranges) the
  stored qparams are used and nothing is observed. Gradients reach ``x`` through torch's
  straight-through mask. Toggle a whole model with ``jo.disable_observer(variables)``,
  ``jo.disable_fake_quant(variables)`` and friends (re-exported here).

  The config's ``trainable_fields`` (LSQ's ``scale`` and ``zero_point`` for
  ``jo.LearnableFakeQuantize``) are ``'params'`` so the optimizer trains them; while the state's
  ``static_enabled`` flag is on (calibration), apply with ``mutable=["observers", "params"]`` so the
  observed qparams are written into those params.

  Attributes:
    config: a fake-quant config, its class, or a ``with_args`` partial.
    axis_name: a mapped axis to sync the observer's batch statistic over.
  """

  config: Any
  axis_name: Any = None

  config_field = "config"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    state_var = self.variable(COLLECTION, "state", self.config.init, x)
    state = state_var.value
    trainable = self.config.trainable_fields
    params = {name: self.param(name, lambda _, v: v, getattr(state, name)) for name in trainable}
    state = state.replace(**params)
    if self.is_initializing():  # the variables exist now; skip tracing the fake quant itself
      return x
    updating = _updating(self)
    if not updating:
      state = disable_observer(state)
    y, new_state = self.config.apply(state, x, axis_name=self.axis_name)
    if updating:
      if self.is_mutable_collection("params"):
        for name in trainable:
          self.put_variable("params", name, getattr(new_state, name))
      state_var.value = new_state
    return y


def calibrate(
  model: nn.Module,
  variables,
  batches: Iterable,
  *,
  progress: bool | str = False,
  mutable=(COLLECTION,),
  **kwargs,
):
  """Runs ``model.apply(variables, batch, mutable=mutable, **kwargs)`` jitted over ``batches``.

  Args:
    model: a linen module with :class:`Observe` or :class:`FakeQuant` inside.
    variables: its variables (``model.init(...)``), with an ``'observers'`` collection.
    batches: an iterable of inputs; a tuple is passed as positional arguments.
    progress: draw a progress bar on stderr (a string: with that label).
    mutable: the collections the calibration may change (add ``"params"`` for LSQ).
    **kwargs: passed to ``model.apply`` (static: e.g. ``train=False``).

  Returns:
    ``variables`` with the updated collections.

  Raises:
    ValueError: ``variables`` has no ``'observers'`` collection, ``batches`` is empty, or no observer
      state changed (observers disabled or in quantize mode, ...).
  """
  if COLLECTION not in variables:
    raise ValueError(
      f"variables has no {COLLECTION!r} collection (it has {sorted(variables)}): the model holds no "
      "jo.linen.Observe or FakeQuant, or variables came from another model."
    )
  jitted = jax.jit(lambda v, args: model.apply(v, *args, mutable=list(mutable), **kwargs)[1])
  current = {"variables": variables}

  def step(args):
    current["variables"] = {**current["variables"], **jitted(current["variables"], args)}

  calibration.run(
    step,
    batches,
    states=lambda: current["variables"][COLLECTION],
    progress=progress,
    name=type(model).__name__,
    disable_hint="jo.disable_observer",
  )
  return current["variables"]


def _sites(model: nn.Module, variables, args, kwargs) -> dict[tuple[str, ...], tuple]:
  """Module path -> (config, input spec) of every quantizer that ``model.apply`` reaches."""
  sites = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, _Quantizer) and context.method_name == "__call__":
      x = call_args[0]
      sites[module.path] = (module.quantizer_config(), jax.ShapeDtypeStruct(np.shape(x), x.dtype))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
  return sites


def calculate_qparams(model: nn.Module, variables, *args, **kwargs) -> dict:
  """The QParams of every observer in ``model``, keyed by module path (a nested dict).

  The model is traced once with ``*args, **kwargs`` (``jax.eval_shape``: nothing runs) to find each
  observer's config; the qparams come from the states in ``variables``. A layer under ``nn.scan`` or
  ``nn.vmap`` (``variable_axes={"observers": 0, ...}``) gets its qparams stacked the same way.
  Observers without qparams (``PlaceholderObserver``, ...) are left out.

  Raises:
    ValueError: a state in ``variables['observers']`` belongs to no module that these arguments
      reach, or its shape does not fit its observer.
  """
  sites = _sites(model, variables, args, kwargs)
  states = variables.get(COLLECTION, {})
  out: dict = {}
  for path in stacked.state_paths(states):
    if path not in sites:
      raise ValueError(
        f"the observer state at {'/'.join(path)!r} was not reached by model.apply(variables, "
        "*args): pass arguments that run every observer (or remove stale states)."
      )
    config, spec = sites[path]
    state = stacked.subtree(states, path)["state"]
    fields = {n: stacked.subtree(variables["params"], path)[n] for n in config.trainable_fields}
    state = state.replace(**fields)
    try:
      qparams = stacked.calculate_qparams(config, state, spec, "/".join(path))
    except QParamsUnavailableError:
      continue
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = qparams
  return out


__all__ = [
  "COLLECTION",
  "FakeQuant",
  "Observe",
  "calculate_qparams",
  "calibrate",
  "disable_fake_quant",
  "disable_observer",
  "enable_fake_quant",
  "enable_observer",
  "enable_param_learning",
  "enable_static_estimate",
  "enable_static_observation",
]
