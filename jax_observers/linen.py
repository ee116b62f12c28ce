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


def calculate_qparams(model: nn.Module, variables, *args, **kwargs) -> dict:
  """The QParams of every observer in ``model``, keyed by module path (a nested dict).

  Runs ``model.apply(variables, *args, **kwargs)`` once without touching the statistics.
  """
  _, out = model.apply(variables, *args, mutable=[QPARAMS], **kwargs)
  return _strip(dict(out.get(QPARAMS, {})))


def _strip(tree):
  """Drops the ``"qparams"`` variable-name level: {"act": {"qparams": qp}} -> {"act": qp}."""
  if isinstance(tree, dict):
    if set(tree) == {"qparams"} and not isinstance(tree["qparams"], dict):
      return tree["qparams"]
    return {k: _strip(v) for k, v in tree.items()}
  return tree
