"""QScheme, QParams, dtype ranges and the Observer protocol shared by every observer."""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import fake_quant_ops as ops
from jax_observers._src.partial import WithArgs
from jax_observers._src.readable import ReadableRepr

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.1920928955078125e-07, torch's default eps


class QScheme(enum.Enum):
  """torch's quantization schemes (``torch.per_tensor_affine`` ...)."""

  PER_TENSOR_AFFINE = "per_tensor_affine"
  PER_TENSOR_SYMMETRIC = "per_tensor_symmetric"
  PER_CHANNEL_AFFINE = "per_channel_affine"
  PER_CHANNEL_SYMMETRIC = "per_channel_symmetric"
  PER_CHANNEL_AFFINE_FLOAT_QPARAMS = "per_channel_affine_float_qparams"

  @property
  def is_per_channel(self) -> bool:
    return self.name.startswith("PER_CHANNEL")

  @property
  def is_symmetric(self) -> bool:
    return self.name.endswith("SYMMETRIC")


per_tensor_affine = QScheme.PER_TENSOR_AFFINE
per_tensor_symmetric = QScheme.PER_TENSOR_SYMMETRIC
per_channel_affine = QScheme.PER_CHANNEL_AFFINE
per_channel_symmetric = QScheme.PER_CHANNEL_SYMMETRIC
per_channel_affine_float_qparams = QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS


class QParams(ReadableRepr, struct.PyTreeNode, repr=False):
  """``scale`` and ``zero_point``; unpacks like torch's ``(scale, zero_point)`` tuple."""

  scale: jax.Array  # shape () per tensor or (C,) per channel, float32.
  zero_point: jax.Array  # like scale; int32, or float32 for per_channel_affine_float_qparams.

  def __iter__(self):
    return iter((self.scale, self.zero_point))


class QParamsUnavailableError(RuntimeError):
  """Raised by ``calculate_qparams`` of observers that only pass tensors through (as torch does)."""


# Default (quant_min, quant_max) per dtype, and with reduce_range: torch's calculate_qmin_qmax.
_INT_RANGES = {
  np.dtype(jnp.int8): ((-128, 127), (-64, 63)),
  np.dtype(jnp.uint8): ((0, 255), (0, 127)),
  np.dtype(jnp.int32): ((-(2**31), 2**31 - 1),) * 2,
  np.dtype(jnp.int16): ((-(2**15), 2**15 - 1),) * 2,
  np.dtype(jnp.uint16): ((0, 2**16 - 1),) * 2,
  np.dtype(jnp.uint4): ((0, 15),) * 2,  # torch.quint4x2
  # torch gives float8 dtypes the quint4x2 integer range (0, 15); kept for parity.
  np.dtype(jnp.float8_e4m3fn): ((0, 15),) * 2,
  np.dtype(jnp.float8_e5m2): ((0, 15),) * 2,
}
UNIFORM_DTYPES = tuple(_INT_RANGES)


def canonical_dtype(dtype: Any, *, allowed=None, arg: str = "dtype") -> np.dtype:
  """``dtype`` as a NumPy dtype, checked against ``allowed``."""
  try:
    out = np.dtype(dtype)
  except TypeError:
    raise ValueError(f"{arg}={dtype!r} is not a dtype.") from None
  if allowed is not None and out not in allowed:
    names = ", ".join(sorted(d.name for d in allowed))
    raise ValueError(f"{arg}={out.name!r} is not supported here; expected one of: {names}.")
  return out


def calculate_qmin_qmax(quant_min, quant_max, has_customized_qrange, dtype, reduce_range):
  """torch's ``calculate_qmin_qmax`` with its assertions turned into ValueErrors."""
  if has_customized_qrange:
    qrange_len = quant_max - quant_min + 1
    if dtype == np.int8 and not 0 < qrange_len <= 256:
      raise ValueError(f"quant_min/quant_max ({quant_min}, {quant_max}) span more than int8's 256.")
    if dtype == np.int32 and not 0 < qrange_len <= 2**32:
      raise ValueError(f"quant_min/quant_max ({quant_min}, {quant_max}) span more than 2**32.")
    if reduce_range:
      return quant_min // 2, quant_max // 2
    return quant_min, quant_max
  return _INT_RANGES[dtype][1 if reduce_range else 0]


def python_scalars(config) -> None:
  """Replaces NumPy scalar fields of a frozen ``config`` (``np.float32(1e-3)``, ``np.int64(64)``) by
  the Python numbers they hold (``.item()``: exact), as torch accepts them; NumPy bools are kept.

  Configs hold Python values only (they hash and compare like the numbers they mean); call this at
  the start of ``__post_init__``, before the fields are checked.
  """
  for field in dataclasses.fields(config):
    value = getattr(config, field.name, None)
    if isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.bool_):
      object.__setattr__(config, field.name, value.item())


def _describe(value) -> str:
  dtype = getattr(value, "dtype", None)
  dtype = np.result_type(value) if dtype is None else np.dtype(dtype)
  return f"{dtype.name}{list(np.shape(value))}"


def describe_state(state) -> str:
  """``MinMaxState(min_val float32[], max_val float32[])``: a state's kind, dtypes and shapes."""
  if not dataclasses.is_dataclass(state):
    return f"a {type(state).__name__}"
  fields = ", ".join(
    f"{f.name} {_describe(getattr(state, f.name))}"
    for f in dataclasses.fields(state)
    if not dataclasses.is_dataclass(getattr(state, f.name))
  )
  return f"{type(state).__name__}({fields})"


def _fits(want: tuple, shape: tuple) -> bool:
  return len(want) == len(shape) and all(w in (None, n) for w, n in zip(want, shape, strict=True))


def check_state(observer, state, kind: type, method: str, fields: Mapping[str, tuple]) -> None:
  """At trace time, a ValueError unless ``state`` is a ``kind`` with the given field shapes/dtypes.

  Args:
    observer: the config whose ``method`` (``'update'``, ``'calculate_qparams'``) got ``state``.
    state: the state passed in (device or NumPy arrays, or tracers: only static facts are read).
    kind: the state class ``observer.init`` returns.
    method: named in the error.
    fields: ``{name: (shapes, dtypes)}``; ``shapes`` a shape tuple or a list of allowed ones
      (``None`` in a shape matches any size; ``shapes=None``: any shape), ``dtypes`` a dtype or a tuple of allowed ones (``None``: any).

  Raises:
    ValueError: naming the observer, the state expected and the state given.
  """
  name = type(observer).__name__

  def fail(reason: str):
    raise ValueError(
      f"{name}.{method} got {describe_state(state)}: {reason}. Build the state with "
      f"{name}.init(x) or load it with jo.load_state_dict({name}(...), d)."
    )

  if not isinstance(state, kind):
    fail(f"it expects a {kind.__name__}")
  for field, (shapes, dtypes) in fields.items():
    value = getattr(state, field)
    shape = tuple(np.shape(value))
    allowed = [tuple(s) for s in shapes] if isinstance(shapes, list) else [tuple(shapes or ())]
    if shapes is not None and not any(_fits(want, shape) for want in allowed):
      wanted = " or ".join(str(["C" if n is None else n for n in s]) for s in allowed)
      fail(f"{field} must have shape {wanted}")
    if dtypes is not None:
      dtypes = tuple(np.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
      got = getattr(value, "dtype", None)
      got = np.result_type(value) if got is None else np.dtype(got)
      if got not in dtypes:
        fail(f"{field} must be {' or '.join(d.name for d in dtypes)}")


def valid_range(min_val, max_val) -> jax.Array:
  """True where ``[min_val, max_val]`` is an observed range (``min_val <= max_val``, no NaN)."""
  return jnp.asarray(min_val) <= jnp.asarray(max_val)


def degenerate_range(min_val, max_val) -> jax.Array:
  """True when some entry is not a valid range while the state is not fresh everywhere.

  A fresh state, ``(+inf, -inf)`` everywhere, is torch's "never observed" (a warning, then the
  default); anything else that is not ``min_val <= max_val`` is what torch asserts on.
  """
  min_val, max_val = jnp.asarray(min_val), jnp.asarray(max_val)
  fresh = jnp.all((min_val == jnp.inf) & (max_val == -jnp.inf))
  return ~fresh & jnp.any(~valid_range(min_val, max_val))


def fake_quantize_on_grid(observer, x, qparams: QParams, enabled=None) -> jax.Array:
  """torch's fake quantization on ``observer``'s ``quant_range`` (per channel on its ``ch_axis``).

  ``enabled``: a boolean flag; where it is False the result is ``x`` (``ops.fake_quantize_where``).
  """
  quant_min, quant_max = observer.quant_range
  scale, zero_point = qparams
  if enabled is not None:
    axis = observer.ch_axis if observer.qscheme.is_per_channel else None
    return ops.fake_quantize_where(enabled, x, scale, zero_point, axis, quant_min, quant_max)
  if observer.qscheme.is_per_channel:
    return ops.fake_quantize_per_channel_affine(
      x, scale, zero_point, observer.ch_axis, quant_min, quant_max
    )
  return ops.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


class Observer(WithArgs, abc.ABC):
  """The observer protocol: a frozen config with pure ``init``, ``update``, ``calculate_qparams``.

  Subclasses are ``@dataclasses.dataclass(frozen=True, kw_only=True)``; their fields carry torch's
  argument names and defaults and hold Python values only, so configs hash and can be jit statics.
  """

  # State fields that are trainable parameters (none for observers; LSQ's scale and zero_point).
  trainable_fields: ClassVar[tuple[str, ...]] = ()

  @abc.abstractmethod
  def init(self, x) -> Any:
    """A fresh state for inputs shaped like ``x`` (only ``x.shape``/``x.dtype`` are read)."""

  @abc.abstractmethod
  def update(self, state, x, *, axis_name=None) -> Any:
    """The state after observing ``x``; with ``axis_name``, after observing the global batch."""

  def calculate_qparams(self, state) -> QParams:
    raise QParamsUnavailableError(
      f"{type(self).__name__} passes tensors through and has no quantization parameters."
    )

  def unobserved(self, state) -> jax.Array | None:
    """True where ``state`` has seen no value, so ``calculate_qparams`` gives torch's default.

    None for observers without that notion. Eager ``calculate_qparams`` warns as torch does when
    this is True ("must run observer before calling calculate_qparams").
    """
    return None

  def degenerate(self, state) -> jax.Array | None:
    """True when ``state`` holds a range torch's ``calculate_qparams`` asserts on.

    An inverted or NaN range, or a channel that saw nothing while others did: ``calculate_qparams``
    gives those entries the default ``(1.0, 0)`` (a defined result under ``jit``) and, called
    eagerly, warns (``compiled.DEGENERATE_WARNING``). None for observers without ranges.
    """
    return None

  def fake_quantize(self, x, qparams: QParams) -> jax.Array:
    """``x`` quantized and dequantized with ``qparams`` on this observer's grid."""
    raise QParamsUnavailableError(f"{type(self).__name__} has no quantization grid to apply.")

  def replace(self, **changes):
    """A copy of this config with ``changes`` (validated again)."""
    return dataclasses.replace(self, **changes)


def check_float_input(x, observer: object) -> jax.Array:
  """``x`` as an array with a real floating dtype, or a TypeError naming the observer."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    x = jnp.asarray(x)
    dtype = x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"{type(observer).__name__} observes floating-point arrays; got x with dtype {dtype}. "
      "Cast integer data to float32 first."
    )
  return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformObserver(Observer):
  """Shared config of torch's ``UniformQuantizationObserverBase`` observers."""

  dtype: Any = jnp.uint8
  qscheme: QScheme = per_tensor_affine
  reduce_range: bool = False
  quant_min: int | None = None
  quant_max: int | None = None
  eps: float = FLOAT32_EPS
  is_dynamic: bool = False
  ignore_nonfinite: bool = False  # True: NaN and +-inf never enter the statistics.

  allowed_qschemes: ClassVar[tuple[QScheme, ...]] = tuple(QScheme)

  def __post_init__(self):
    python_scalars(self)
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype, allowed=UNIFORM_DTYPES))
    names = ", ".join(q.value for q in self.allowed_qschemes)
    if not isinstance(self.qscheme, QScheme):
      raise ValueError(f"qscheme={self.qscheme!r} is not a jo.QScheme; expected one of: {names}.")
    if self.qscheme not in self.allowed_qschemes:
      raise NotImplementedError(
        f"{type(self).__name__} got qscheme={self.qscheme.value!r}; it supports: {names}."
      )
    if not isinstance(self.eps, (int, float)) or math.isnan(self.eps):
      raise ValueError(f"eps={self.eps!r} must be a real number.")
    if self.has_customized_qrange:
      for name in ("quant_min", "quant_max"):
        if not isinstance(getattr(self, name), (int, np.integer)):
          raise ValueError(f"{name}={getattr(self, name)!r} must be an integer.")
      if not self.quant_min <= 0 <= self.quant_max:
        raise ValueError(
          f"quant_min={self.quant_min}, quant_max={self.quant_max}: the range must include 0."
        )
      if self.quant_min >= self.quant_max:
        raise ValueError(
          f"quant_min={self.quant_min} must be less than quant_max={self.quant_max}."
        )
    self.quant_range  # noqa: B018 -- validates the range eagerly.

  def unobserved(self, state) -> jax.Array:
    """True when the running range is still (+inf, -inf) everywhere (torch's check)."""
    return jnp.all(state.min_val == jnp.inf) & jnp.all(state.max_val == -jnp.inf)

  def degenerate(self, state) -> jax.Array:
    """See :meth:`Observer.degenerate`: the running range read from ``state.min_val/max_val``."""
    return degenerate_range(state.min_val, state.max_val)

  def fake_quantize(self, x, qparams: QParams) -> jax.Array:
    """torch's ``fake_quantize_per_{tensor,channel}_affine`` with this observer's range."""
    return fake_quantize_on_grid(self, x, qparams)

  @property
  def has_customized_qrange(self) -> bool:
    """torch: both quant_min and quant_max given (one alone is ignored)."""
    return self.quant_min is not None and self.quant_max is not None

  @property
  def quant_range(self) -> tuple[int, int]:
    """The (quant_min, quant_max) torch's observer ends with, after reduce_range."""
    return calculate_qmin_qmax(
      self.quant_min, self.quant_max, self.has_customized_qrange, self.dtype, self.reduce_range
    )
