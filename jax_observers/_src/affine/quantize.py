r"""torchao's ``quantize_affine`` / ``dequantize_affine`` over a block grid, bit for bit.

For the block holding element :math:`x` with scale :math:`s` and zero point :math:`z`, by
``zero_point_domain`` (each step one float32 rounding, :math:`r = 1/s` rounded once, as torchao):

* INT (``quantize_affine`` / ``dequantize_affine``):
  :math:`q = \mathrm{clip}(\mathrm{rne}(x \cdot r) + z, q_{min}, q_{max})`,
  :math:`\hat x = (q - z) \cdot s`;
* NONE (``_quantize_affine_no_zero_point`` / ``_dequantize_affine_no_zero_point``):
  :math:`q = \mathrm{clip}(\mathrm{rne}(x \cdot r), q_{min}, q_{max})`, :math:`\hat x = q s`;
* FLOAT (``_quantize_affine_tinygemm`` / ``_dequantize_affine_tinygemm``): with
  :math:`c = (q_{max} + q_{min} + 1) / 2`,
  :math:`q = \mathrm{clip}(\mathrm{rne}((x - (z - s c)) / s), q_{min}, q_{max})`,
  :math:`\hat x = (q - c) \cdot s + z`.

Quantization runs in float32 for float32 scales whatever the input dtype (torchao promotes a
bfloat16 input against the float32 scale, so the codes agree). Dequantization rounds like torchao
for every ``output_dtype``: INT casts :math:`q` and :math:`z` to ``output_dtype`` and subtracts
there, NONE casts :math:`q`, FLOAT rounds :math:`q - c` (float32), the product and the sum to it;
the product with the float32 scale is float32 and rounded once more at the end. So :math:`q - z` is
never an integer subtraction: int32 codes do not wrap (torchao's float32 ``q - z`` as well).

Inside the range the round trip is within half a step: :math:`|x - \hat x| \le s / 2` up to the
float32 roundings of :math:`r`, the product and the dequantization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import compiled, numerics
from jax_observers._src.affine import granularity as gran
from jax_observers._src.affine import qparams as aq
from jax_observers._src.config import float_input

ZPD = aq.ZeroPointDomain


def _per_block(layout: gran.BlockLayout, value, name: str) -> jax.Array:
  value = jnp.asarray(value)
  if value.size != int(np.prod(layout.state_shape, dtype=np.int64)):
    raise ValueError(
      f"{name} of shape {value.shape} does not hold one value per block: the blocks of an input "
      f"of shape {layout.shape} form a grid of shape {layout.state_shape}."
    )
  return layout.broadcast(value)


def _check_xla_convertible(dtype, name: str) -> None:
  """XLA has no conversion to or from 1-bit integers: a ValueError instead of an MLIR error."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits == 1:
    raise ValueError(
      f"{name}={dtype.name}: XLA cannot convert to or from 1-bit integers; hold 1-bit codes in a "
      f"wider dtype with quant_min/quant_max (e.g. jnp.{'u' if dtype.kind == 'u' else ''}int2 "
      f"with quant_min={int(jnp.iinfo(dtype).min)}, quant_max={int(jnp.iinfo(dtype).max)})."
    )


def quantize_blocks(x, layout, scale, zero_point, *, quant_range, zero_point_domain, dtype):
  """``x`` quantized to ``dtype`` with per-block ``scale``/``zero_point`` laid out by ``layout``."""
  _check_xla_convertible(dtype, "output_dtype")
  qmin, qmax = (np.float32(q) for q in quant_range)
  v = layout.view(jnp.asarray(x).astype(jnp.float32))
  s = _per_block(layout, scale, "scale").astype(jnp.float32)
  if zero_point_domain == ZPD.FLOAT:
    mid = np.float32((quant_range[0] + quant_range[1] + 1) / 2)
    z = _per_block(layout, zero_point, "zero_point").astype(jnp.float32)
    low = z - numerics.rounded(s * mid)
    q = jnp.round(numerics.exact_div(v - low, s))
  else:
    q = jnp.round(v * numerics.exact_div(jnp.ones_like(s), s))
    if zero_point_domain == ZPD.INT:
      q = q + _per_block(layout, zero_point, "zero_point").astype(jnp.float32)
  return layout.unview(jnp.clip(q, qmin, qmax)).astype(dtype)


def dequantize_blocks(q, layout, scale, zero_point, *, quant_range, zero_point_domain, dtype):
  """The float values of ``q`` (``dtype``) with per-block ``scale``/``zero_point``."""
  out_dtype = jnp.dtype(dtype)
  f32 = jnp.float32
  _check_xla_convertible(jnp.result_type(q), "input dtype")

  def to_out(a):  # torchao's ``.to(output_dtype)``, held in float32 (via float32, as torch)
    return a.astype(f32).astype(out_dtype).astype(f32)

  v = layout.view(jnp.asarray(q))
  s = _per_block(layout, scale, "scale").astype(f32)
  if zero_point_domain == ZPD.INT:
    z = _per_block(layout, zero_point, "zero_point")
    out = to_out(to_out(v) - to_out(z)) * s
  elif zero_point_domain == ZPD.NONE:
    out = to_out(v) * s
  else:
    mid = np.float32((quant_range[0] + quant_range[1] + 1) / 2)
    z = _per_block(layout, zero_point, "zero_point").astype(f32)
    out = to_out(numerics.rounded(to_out(v.astype(f32) - mid) * s)) + z
  return layout.unview(out).astype(out_dtype)


@compiled.eager_compiled_function("x", "scale", "zero_point")
def quantize_affine(
  x: jax.typing.ArrayLike,
  block_size,
  scale: jax.typing.ArrayLike,
  zero_point: jax.typing.ArrayLike,
  output_dtype,
  quant_min: int | None = None,
  quant_max: int | None = None,
  zero_point_domain: aq.ZeroPointDomain = ZPD.INT,
  *,
  pad: bool = False,
) -> jax.Array:
  """torchao's ``quantize_affine``: ``x`` to integers of ``output_dtype``, block by block.

  The INT domain is torchao 0.18's ``quantize_affine``, NONE its ``_quantize_affine_no_zero_point``,
  FLOAT its ``_quantize_affine_tinygemm``. Codes beyond int32's range saturate (torchao's clamp to
  :math:`2^{31}` in float32 wraps to INT_MIN on x86).

  Args:
    x: a float array.
    block_size: a :class:`Granularity` or torchao's block_size tuple.
    scale, zero_point: one value per block, as :func:`choose_qparams_affine` returns them.
    output_dtype: the integer dtype (``jnp.int4``, ``jnp.uint8`` ...).
    quant_min, quant_max: a custom range inside the dtype's.
    zero_point_domain: a :class:`ZeroPointDomain`.
    pad: the blocks may end in a partial one (as ``choose_qparams_affine(..., pad=True)``).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> w = jnp.array([[-1.0, 0.5, 0.25, 1.0]])
    >>> qp = jo.choose_qparams_affine(w, jo.MappingType.SYMMETRIC, jo.PerGroup(2), jnp.int4)
    >>> jo.quantize_affine(w, jo.PerGroup(2), *qp, jnp.int4).tolist()  # -1 * fl(1/s) = -7.4999996
    [[-7, 4, 2, 7]]
  """
  x = float_input(x, "quantize_affine")
  aq.check_mapping(aq.MappingType.ASYMMETRIC, zero_point_domain, True)
  quant_range = aq.affine_quant_range(output_dtype, quant_min, quant_max)
  layout = gran.block_layout(jnp.shape(x), aq.as_granularity(block_size), pad=pad)
  return quantize_blocks(
    x,
    layout,
    scale,
    zero_point,
    quant_range=quant_range,
    zero_point_domain=zero_point_domain,
    dtype=output_dtype,
  )


@compiled.eager_compiled_function("q", "scale", "zero_point")
def dequantize_affine(
  q: jax.typing.ArrayLike,
  block_size,
  scale: jax.typing.ArrayLike,
  zero_point: jax.typing.ArrayLike,
  input_dtype,
  quant_min: int | None = None,
  quant_max: int | None = None,
  zero_point_domain: aq.ZeroPointDomain = ZPD.INT,
  *,
  output_dtype=jnp.float32,
  pad: bool = False,
) -> jax.Array:
  """torchao's ``dequantize_affine``: integers back to floats, block by block.

  The INT domain is torchao 0.18's ``dequantize_affine``, NONE its
  ``_dequantize_affine_no_zero_point``, FLOAT its ``_dequantize_affine_tinygemm``, each with
  torchao's roundings for ``output_dtype`` (float32, bfloat16 or float16; see the module doc).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> q = jnp.array([[-8, 4, 2, 7]], jnp.int4)
    >>> scale, zero_point = jnp.array([[0.125, 0.125]]), jnp.zeros((1, 2), jnp.int32)
    >>> jo.dequantize_affine(q, jo.PerGroup(2), scale, zero_point, jnp.int4).tolist()
    [[-1.0, 0.5, 0.25, 0.875]]
  """
  aq.check_mapping(aq.MappingType.ASYMMETRIC, zero_point_domain, True)
  quant_range = aq.affine_quant_range(input_dtype, quant_min, quant_max)
  layout = gran.block_layout(jnp.shape(q), aq.as_granularity(block_size), pad=pad)
  return dequantize_blocks(
    q,
    layout,
    scale,
    zero_point,
    quant_range=quant_range,
    zero_point_domain=zero_point_domain,
    dtype=output_dtype,
  )
