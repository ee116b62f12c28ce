"""``with_args`` / ``with_callable_args``: torch's ``_PartialWrapper`` as a frozen dataclass.

A :class:`PartialConfig` is a layer over a target (an observer class or another layer) with fixed
keyword arguments and keyword arguments produced by callables. Calling it builds the target, exactly
as torch does:

* ``with_args(**kw)`` adds a layer whose ``kw`` are defaults: later layers and call-time keywords
  override them (functools.partial semantics).
* ``with_callable_args(**kw)`` merges ``kw`` into this layer's callables (it does not add a layer);
  each callable is evaluated at every construction unless the keyword reaches the layer from outside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import compiled


def _field_names(cls: type) -> frozenset[str]:
  return frozenset(f.name for f in dataclasses.fields(cls) if f.init)


@dataclasses.dataclass(frozen=True)
class PartialConfig:
  """A frozen, comparable, chainable partial observer (or fake-quant) config.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> make = jo.MinMaxObserver.with_args(dtype=jnp.int8).with_args(qscheme=jo.per_tensor_symmetric)
    >>> obs = make()
    >>> obs.dtype, obs.qscheme
    (dtype('int8'), <QScheme.PER_TENSOR_SYMMETRIC: 'per_tensor_symmetric'>)
    >>> make() == obs and make() is not obs
    True
  """

  target: Any  # an observer class or another PartialConfig
  keywords: tuple[tuple[str, Any], ...] = ()
  callable_args: tuple[tuple[str, Callable[[], Any]], ...] = ()

  def __post_init__(self):
    allowed = _field_names(self.root)
    for name, _ in self.keywords + self.callable_args:
      if name not in allowed:
        raise TypeError(
          f"{self.root.__name__} has no argument {name!r}; expected one of {sorted(allowed)}."
        )
    for name, fn in self.callable_args:
      if not callable(fn):
        raise TypeError(f"with_callable_args({name}=...) needs a callable, got {fn!r}.")

  @property
  def root(self) -> type:
    """The class this partial finally constructs."""
    target = self.target
    while isinstance(target, PartialConfig):
      target = target.target
    return target

  @property
  def resolved_keywords(self) -> dict[str, Any]:
    """The fixed keywords of every layer merged, outermost winning (callables not evaluated)."""
    inner = self.target.resolved_keywords if isinstance(self.target, PartialConfig) else {}
    return {**inner, **dict(self.keywords)}

  def __call__(self, **keywords):
    for name, fn in self.callable_args:
      if name not in keywords:
        keywords = {**keywords, name: fn()}
    return self.target(**{**dict(self.keywords), **keywords})

  def with_args(self, **keywords) -> PartialConfig:
    """Returns a new layer whose ``keywords`` override this one's."""
    return PartialConfig(self, tuple(keywords.items()))

  def with_callable_args(self, **callables) -> PartialConfig:
    """Returns this layer with ``callables`` merged in, evaluated at each construction."""
    merged = {**dict(self.callable_args), **callables}
    return PartialConfig(self.target, self.keywords, tuple(merged.items()))

  def __repr__(self):
    name = self.target.__name__ if isinstance(self.target, type) else repr(self.target)
    args = ", ".join(f"{k}={v!r}" for k, v in self.keywords)
    calls = "".join(f", {k}=<call {getattr(v, '__name__', v)!r}>" for k, v in self.callable_args)
    return f"{name}.with_args({args}{calls})"


compiled.register(PartialConfig)


class WithArgs:
  """Mixin giving a config dataclass torch's ``with_args`` and ``with_callable_args``.

  Every subclass is also a pytree with no leaves, and its public methods called eagerly run one
  cached compile (:mod:`jax_observers._src.compiled`).
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    compiled.compile_methods(cls)

  @classmethod
  def with_args(cls, **keywords) -> PartialConfig:
    """A partial config of ``cls``; unknown argument names fail here, not at construction."""
    return PartialConfig(cls, tuple(keywords.items()))

  @classmethod
  def with_callable_args(cls, **callables) -> PartialConfig:
    """A partial config whose ``callables`` are evaluated each time it constructs ``cls``."""
    return PartialConfig(cls, (), tuple(callables.items()))


def resolve_config(config, *, arg: str = "observer"):
  """A config instance from a config, a :class:`PartialConfig` (called once, as torch calls
  ``qconfig.activation()``) or a config class (its defaults); a TypeError naming ``arg`` else."""
  if isinstance(config, PartialConfig) or (
    isinstance(config, type) and issubclass(config, WithArgs)
  ):
    config = config()
  if not isinstance(config, WithArgs):
    raise TypeError(
      f"{arg}={config!r} is not a jax_observers config: pass an observer or fake-quant config "
      "(jo.MinMaxObserver()), its class, or a with_args partial."
    )
  return config


def float_input(x, owner) -> jax.Array:
  """``x`` as an array with a real floating dtype, or a TypeError naming ``owner`` (a config, whose
  class is named, or a function name): the one input check of every observer and op."""
  name = owner if isinstance(owner, str) else type(owner).__name__
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f"{name} takes floating-point arrays; got x with dtype {x.dtype}. "
      "Cast integer data to float32 first."
    )
  return x


def normalized_axis(axis, shape, *, name: str = "ch_axis", where: str = "") -> int:
  """``axis`` (negative counts from the end) as an index into ``shape``, or a ValueError naming
  ``name=axis`` and the shape: the one channel-axis check."""
  ndim = len(shape)
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise TypeError(f"{where}{name}={axis!r} must be an int.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{where}{name}={axis} is out of range for an input of shape {tuple(shape)}.")
  return int(axis) % ndim
