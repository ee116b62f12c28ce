r"""torchao's ``choose_qparams_affine`` family: per-block (min, max) to (scale, zero point), exactly.

With :math:`m^- = \min(m, 0)`, :math:`M^+ = \max(M, 0)` (``preserve_zero``; else :math:`m, M` as
they are), :math:`[q_{min}, q_{max}]` the target range and every step one float32 rounding:

* ``SYMMETRIC``: :math:`s = \max(\frac{\max(-m^-, M^+)}{(q_{max} - q_{min}) / 2}, \epsilon)`;
* ``SYMMETRIC_NO_CLIPPING_ERR``: :math:`s = \max(\max(\frac{m^-}{q_{min}}, \frac{M^+}{q_{max}}),
  \epsilon)` (no value is clipped on either side);
* both symmetric: :math:`z = \mathrm{int}((q_{max} + q_{min} + 1) / 2)` (128 for uint8, 8 for
  uint4, 0 for signed types);
* ``ASYMMETRIC``: :math:`s = \max(\frac{M^+ - m^-}{q_{max} - q_{min}}, \epsilon)` and, by
  ``zero_point_domain``: INT :math:`z = \mathrm{clip}(q_{min} - \mathrm{rne}(m^- / s), q_{min},
  q_{max})`; FLOAT :math:`z = m^- + s \cdot (q_{max} + q_{min} + 1) / 2`; NONE no zero point.

:math:`\epsilon` defaults to ``finfo(dtype).smallest_normal`` as in torchao 0.18 (``dtype`` the
input's for the functions, float32 for the observers' float32 state); torchao before 0.10 and its
pt2e copy (``torchao.quantization.pt2e``) use ``finfo(dtype).eps``. ``quant_min == quant_max`` is
allowed as in torchao: the scale is then ``inf`` (or NaN for an all-zero block).

torchao 0.18 split the old ``preserve_zero`` / ``zero_point_domain`` arguments into separate
functions; each jo configuration is one of them (``torchao.quantization.quant_primitives``):

===============================================  ==================================================
jo arguments                                     torchao 0.18 function
===============================================  ==================================================
any mapping, ``preserve_zero=True``, INT         ``choose_qparams_affine`` (``_with_min_max``)
any mapping, ``preserve_zero=True``, NONE        the same, zero point dropped (jo returns zeros)
ASYMMETRIC, ``preserve_zero=False``, INT / NONE  ``_choose_qparams_affine_dont_preserve_zero``
ASYMMETRIC, ``preserve_zero=False``, FLOAT       ``_choose_qparams_affine_tinygemm``
ASYMMETRIC, ``preserve_zero=True``, FLOAT        none: the tinygemm formula on :math:`[m^-, M^+]`
===============================================  ==================================================

Statistics and scales are float32 whatever the input dtype: for a bfloat16 input jo returns
torchao's qparams of ``x.float()`` (torchao computes in bfloat16 and returns a bfloat16 scale).
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import compiled, numerics, stats
from jax_observers._src.affine import granularity as gran
from jax_observers._src.base import QParams, canonical_dtype
from jax_observers._src.config import float_input


class MappingType(enum.Enum):
  """torchao's ``MappingType`` (same names and values as torch's copy)."""

  SYMMETRIC = 1
  SYMMETRIC_NO_CLIPPING_ERR = 2
  ASYMMETRIC = 3


class ZeroPointDomain(enum.Enum):
  """torchao's ``ZeroPointDomain``: an integer zero point, a float one (tinygemm), or none."""

  INT = 1
  FLOAT = 2
  NONE = 3


_INT_DTYPES = tuple(
  np.dtype(d)
  for d in (
    jnp.int1,
    jnp.int2,
    jnp.int4,
    jnp.int8,
    jnp.int16,
    jnp.int32,
    jnp.uint1,
    jnp.uint2,
    jnp.uint4,
    jnp.uint8,
  )
)
AFFINE_DTYPES = _INT_DTYPES
SMALLEST_NORMAL = float(np.finfo(np.float32).smallest_normal)  # torchao 0.18's default eps


def affine_quant_range(target_dtype, quant_min=None, quant_max=None) -> tuple[int, int]:
  """torchao's ``_get_and_check_qmin_qmax``: the dtype's range, or a custom one inside it."""
  dtype = canonical_dtype(target_dtype, allowed=AFFINE_DTYPES, arg="target_dtype")
  lo, hi = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
  qmin = lo if quant_min is None else quant_min
  qmax = hi if quant_max is None else quant_max
  for name, value in (("quant_min", qmin), ("quant_max", qmax)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name}={value!r} must be an int.")
  if not lo <= qmin <= qmax <= hi:
    raise ValueError(
      f"quant_min={qmin}, quant_max={qmax} must satisfy {lo} <= quant_min <= quant_max <= {hi} "
      f"for target_dtype={dtype.name}."
    )
  return int(qmin), int(qmax)


def check_mapping(mapping_type, zero_point_domain, preserve_zero) -> None:
  """The combinations torchao refuses, as ValueErrors naming the arguments."""
  if not isinstance(mapping_type, MappingType):
    raise ValueError(f"mapping_type={mapping_type!r} is not a jo.MappingType.")
  if not isinstance(zero_point_domain, ZeroPointDomain):
    raise ValueError(
      f"zero_point_domain={zero_point_domain!r} is not a jo.ZeroPointDomain (use NONE, not None)."
    )
  if not isinstance(preserve_zero, bool):
    raise ValueError(f"preserve_zero={preserve_zero!r} must be a bool.")
  if mapping_type != MappingType.ASYMMETRIC:
    if not preserve_zero:
      raise ValueError(
        f"preserve_zero=False is not supported for mapping_type={mapping_type.name}."
      )
    if zero_point_domain == ZeroPointDomain.FLOAT:
      raise ValueError(f"zero_point_domain=FLOAT is not supported for {mapping_type.name}.")


def default_eps(dtype) -> float:
  """torchao 0.18's default eps for statistics of ``dtype``: ``finfo(dtype).smallest_normal``."""
  dtype = jnp.dtype(dtype)
  return float(
    jnp.finfo(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32).smallest_normal
  )


def check_eps(eps, default: float = SMALLEST_NORMAL) -> float:
  """``eps`` as a float (None: ``default``), or a ValueError naming it."""
  if eps is None:
    return default
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps):
    raise ValueError(f"eps={eps!r} must be None or a real number.")
  return float(eps)


def _torch_max(a, b):
  """``torch.max(a, b)`` / ``clamp(a, min=b)``: ``a`` unless ``b`` is larger or NaN (so the sign of
  a zero comes from ``a``, where XLA's max returns +0)."""
  return jnp.where((a < b) | jnp.isnan(b), b, a)


def _torch_min(a, b):
  """``torch.min(a, b)``: ``a`` unless ``b`` is smaller or NaN."""
  return jnp.where((b < a) | jnp.isnan(b), b, a)


def qparams_from_min_max(
  min_val,
  max_val,
  *,
  mapping_type: MappingType,
  quant_range: tuple[int, int],
  eps: float,
  preserve_zero: bool = True,
  zero_point_domain: ZeroPointDomain = ZeroPointDomain.INT,
) -> QParams:
  """The module formulas on float32 ``min_val``/``max_val`` of any shape (no validation)."""
  qmin, qmax = quant_range
  f32 = np.float32
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  if preserve_zero:
    min_neg, max_pos = _torch_min(min_val, f32(0)), _torch_max(max_val, f32(0))
  else:
    min_neg, max_pos = min_val, max_val
  if mapping_type == MappingType.SYMMETRIC:
    amax = _torch_max(-min_neg, max_pos)
    scale = numerics.exact_div(amax, f32((qmax - qmin) / 2))
  elif mapping_type == MappingType.SYMMETRIC_NO_CLIPPING_ERR:
    smin = numerics.exact_div(min_neg, f32(qmin))
    smax = numerics.exact_div(max_pos, f32(qmax))
    scale = jnp.where(smin > smax, smin, smax)
  else:
    scale = numerics.exact_div(max_pos - min_neg, f32(qmax - qmin))
  scale = _torch_max(scale, f32(eps))
  if zero_point_domain == ZeroPointDomain.NONE:
    zero_point = jnp.zeros(scale.shape, jnp.int32)
  elif mapping_type != MappingType.ASYMMETRIC:
    zero_point = jnp.full(scale.shape, int((qmax + qmin + 1) / 2), jnp.int32)
  elif zero_point_domain == ZeroPointDomain.FLOAT:
    mid = f32((qmax + qmin + 1) / 2)
    zero_point = min_neg + numerics.rounded(scale * mid)
  else:
    zp = f32(qmin) - jnp.round(numerics.exact_div(min_neg, scale))
    zero_point = numerics.x86_to_int32(jnp.clip(zp, f32(qmin), f32(qmax)))
  return QParams(scale=scale, zero_point=zero_point)


def unobserved_to_default(qp: QParams, min_val, max_val) -> QParams:
  """Blocks that saw no value (``min = +inf, max = -inf``) get torch's default ``(1, 0)``."""
  seen = ~((min_val == jnp.inf) & (max_val == -jnp.inf))
  return QParams(
    scale=jnp.where(seen, qp.scale, jnp.float32(1.0)),
    zero_point=jnp.where(seen, qp.zero_point, jnp.zeros_like(qp.zero_point)),
  )


@compiled.eager_compiled_function("min_val", "max_val")
def choose_qparams_affine_with_min_max(
  min_val,
  max_val,
  mapping_type: MappingType,
  target_dtype,
  quant_min: int | None = None,
  quant_max: int | None = None,
  eps: float | None = None,
  preserve_zero: bool = True,
  zero_point_domain: ZeroPointDomain = ZeroPointDomain.INT,
) -> QParams:
  """torchao's ``choose_qparams_affine_with_min_max``: qparams from already reduced ranges.

  The defaults are torchao 0.18's function (``eps=None``: ``finfo(min_val.dtype).smallest_normal``);
  ``preserve_zero=False`` and the FLOAT domain give the qparams of
  ``_choose_qparams_affine_dont_preserve_zero`` / ``_choose_qparams_affine_tinygemm`` for the same
  ranges (the module table), which torchao 0.18 only offers from an input tensor.

  Returns:
    ``QParams`` shaped like ``min_val``: float32 scale; int32 zero point (float32 for the FLOAT
    domain; zeros for NONE, where torchao returns None).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> qp = jo.choose_qparams_affine_with_min_max(
    ...   jnp.array([-1.0, 0.0]), jnp.array([2.0, 3.0]), jo.MappingType.ASYMMETRIC, jnp.uint4)
    >>> qp.scale.tolist(), qp.zero_point.tolist()
    ([0.20000000298023224, 0.20000000298023224], [5, 0])
  """
  check_mapping(mapping_type, zero_point_domain, preserve_zero)
  return qparams_from_min_max(
    min_val,
    max_val,
    mapping_type=mapping_type,
    quant_range=affine_quant_range(target_dtype, quant_min, quant_max),
    eps=check_eps(eps, default_eps(jnp.result_type(min_val))),
    preserve_zero=preserve_zero,
    zero_point_domain=zero_point_domain,
  )


def as_granularity(block_size) -> gran.Granularity:
  """A Granularity as is, or torchao's full-rank ``block_size`` tuple as ``PerBlock``."""
  if isinstance(block_size, gran.Granularity):
    return block_size
  return gran.PerBlock(tuple(block_size))


@compiled.eager_compiled_function("x")
def choose_qparams_affine(
  x: jax.typing.ArrayLike,
  mapping_type: MappingType,
  block_size,
  target_dtype,
  quant_min: int | None = None,
  quant_max: int | None = None,
  eps: float | None = None,
  preserve_zero: bool = True,
  zero_point_domain: ZeroPointDomain = ZeroPointDomain.INT,
  *,
  pad: bool = False,
) -> QParams:
  """torchao's ``choose_qparams_affine``: per-block qparams of ``x`` alone (dynamic quantization).

  Args:
    x: a float array; its statistics are float32 whatever its dtype (torchao: the input dtype).
    mapping_type: a :class:`MappingType`.
    block_size: a :class:`Granularity` or torchao's block_size tuple (one entry per axis of ``x``).
    target_dtype: ``jnp.int8``, ``jnp.uint8``, ``jnp.int4``, ``jnp.uint4``, ``jnp.int2`` ...
    quant_min, quant_max: a custom range inside the dtype's.
    eps: smallest scale (None: ``finfo(x.dtype).smallest_normal``, torchao 0.18).
    preserve_zero: widen each block's range to include 0 (False: torchao's
      ``_choose_qparams_affine_dont_preserve_zero``, or ``_tinygemm`` in the FLOAT domain).
    zero_point_domain: a :class:`ZeroPointDomain` (see the module table for the torchao function).
    pad: allow a partial last block (ModelOpt / ONNX Runtime) instead of raising.

  Returns:
    ``QParams`` in torchao's shape (one entry per block; whole-block axes dropped). NaN elements are
    skipped; a block of only NaN gets ``(1, 0)``.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> w = jnp.arange(16.0).reshape(2, 8) - 4.0
    >>> qp = jo.choose_qparams_affine(w, jo.MappingType.SYMMETRIC, jo.PerGroup(4), jnp.int4)
    >>> qp.scale.shape, qp.zero_point.tolist()
    ((2, 2), [[0, 0], [0, 0]])
  """
  x = float_input(x, "choose_qparams_affine")
  check_mapping(mapping_type, zero_point_domain, preserve_zero)
  quant_range = affine_quant_range(target_dtype, quant_min, quant_max)
  layout = gran.block_layout(jnp.shape(x), as_granularity(block_size), pad=pad)
  lo, hi = stats.batch_min_max(layout.view(x), layout.stat_axes, ignore_nonfinite=False)
  qp = qparams_from_min_max(
    lo,
    hi,
    mapping_type=mapping_type,
    quant_range=quant_range,
    eps=check_eps(eps, default_eps(x.dtype)),
    preserve_zero=preserve_zero,
    zero_point_domain=zero_point_domain,
  )
  return unobserved_to_default(qp, lo, hi)
