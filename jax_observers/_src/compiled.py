"""Configs are static pytrees, and their methods called eagerly run one cached compile.

A config (observer, fake quant, calibrator, ``PartialConfig``) is a pytree node with no leaves: the
config itself is the tree's static data. So ``jax.jit(f)(config, state, x)`` works like any other
argument, and two equal configs share one compile, as a static argument would.

A public method (``init``, ``update``, ``calculate_qparams``, ``apply``, ...) called outside any JAX
transformation dispatches to one ``jax.jit`` of that method, cached by JAX on the (hashable) config,
the argument shapes and dtypes and ``axis_name``: the second eager call with the same shapes
compiles nothing and costs about what the jitted call does. Inside ``jit``, ``vmap``, ``grad``,
``scan`` or ``shard_map`` (any argument is a tracer) the method runs as written, so nothing changes
for traced code.

Examples:
  >>> import jax, jax.numpy as jnp, jax_observers as jo
  >>> obs = jo.MinMaxObserver()
  >>> jax.tree_util.tree_leaves(obs)
  []
  >>> x = jnp.array([-1.0, 2.0])
  >>> state = jax.jit(lambda o, x: o.update(o.init(x), x))(obs, x)
  >>> float(state.max_val)
  2.0
"""

from __future__ import annotations

import functools
import inspect
import warnings

import jax

# The methods that dispatch to a compiled call when used eagerly.
METHODS = (
  "init",
  "update",
  "calculate_qparams",
  "apply",
  "quantize",
  "dequantize",
  "fake_quantize",
  "unobserved",
  "degenerate",
)

UNOBSERVED_WARNING = "must run observer before calling calculate_qparams. Returning default values."
DEGENERATE_WARNING = (
  "calculate_qparams got a degenerate range (min_val > max_val, NaN, or a channel that saw no "
  "value while others did); those entries get the default scale=1.0, zero_point=0."
)


def register(cls: type) -> None:
  """Registers ``cls`` as a pytree with no leaves (the instance is its own static data)."""
  jax.tree_util.register_static(cls)


def _traced(args, kwargs) -> bool:
  leaves = jax.tree_util.tree_leaves((args, kwargs))
  return any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


@functools.cache
def _jitted(fn):
  """One ``jax.jit`` per method function; keyword-only arguments (``axis_name``) are static."""
  static = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
  return jax.jit(fn, static_argnames=static)


def eager_compiled(fn):
  """``fn`` (a config method) running through a cached ``jax.jit`` when called outside a trace."""

  @functools.wraps(fn)
  def method(self, *args, **kwargs):
    if _traced(args, kwargs):
      return fn(self, *args, **kwargs)
    return _jitted(fn)(self, *args, **kwargs)

  method.eager_compiled = True
  return method


def eager_compiled_function(*array_args: str):
  """A public function that runs one cached ``jax.jit`` when called outside a trace.

  ``array_args`` name the array parameters; every other argument (dtypes, block sizes, enums,
  ranges) is static, so each distinct setting compiles once. Unhashable settings run as written.
  """

  def wrap(fn):
    signature = inspect.signature(fn)
    static = [name for name in signature.parameters if name not in array_args]
    jitted = jax.jit(fn, static_argnames=static)

    @functools.wraps(fn)
    def function(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      arrays = [bound.arguments.get(name) for name in array_args]
      if _traced(arrays, {}):
        return fn(*args, **kwargs)
      arguments = {
        k: tuple(v) if isinstance(v, list) and k not in array_args else v
        for k, v in bound.arguments.items()
      }
      try:
        hash(tuple(v for k, v in arguments.items() if k not in array_args))
      except TypeError:
        return fn(*args, **kwargs)
      return jitted(**arguments)

    return function

  return wrap


def warn_about_state(config, state) -> None:
  """After an eager ``calculate_qparams``: torch's warning for a state that observed nothing, or
  the degenerate-range warning (``config.degenerate(state)``: those entries got ``(1, 0)``)."""
  if _traced((state,), {}):
    return
  for check, message in (
    (config.unobserved, UNOBSERVED_WARNING),
    (config.degenerate, DEGENERATE_WARNING),
  ):
    flag = check(state)
    if flag is not None and bool(flag):
      warnings.warn(message, UserWarning, stacklevel=3)
      return


def compile_methods(cls: type) -> None:
  """Wraps the public methods ``cls`` defines with :func:`eager_compiled`; registers the pytree."""
  register(cls)
  for name in METHODS:
    fn = cls.__dict__.get(name)
    if fn is None or not inspect.isfunction(fn) or getattr(fn, "eager_compiled", False):
      continue
    wrapped = eager_compiled(fn)
    if name == "calculate_qparams":
      wrapped = _warning_qparams(wrapped)
    setattr(cls, name, wrapped)


def _warning_qparams(method):
  @functools.wraps(method)
  def calculate_qparams(self, state, *args, **kwargs):
    out = method(self, state, *args, **kwargs)
    warn_about_state(self, state)
    return out

  calculate_qparams.eager_compiled = True
  return calculate_qparams
