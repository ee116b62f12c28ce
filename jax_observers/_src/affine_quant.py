r"""torchao's ``quantize_affine`` / ``dequantize_affine`` over a block grid, bit for bit in float32.

For the block holding element :math:`x` with scale :math:`s` and zero point :math:`z`, by
``zero_point_domain`` (each step one float32 rounding, :math:`r = 1/s` rounded once, as torchao):

* INT: :math:`q = \mathrm{clip}(\mathrm{rne}(x \cdot r) + z, q_{min}, q_{max})`,
  :math:`\hat x = (q - z) \cdot s`;
* NONE: :math:`q = \mathrm{clip}(\mathrm{rne}(x \cdot r), q_{min}, q_{max})`, :math:`\hat x = q s`;
* FLOAT (tinygemm): with :math:`c = (q_{max} + q_{min} + 1) / 2`,
  :math:`q = \mathrm{clip}(\mathrm{rne}((x - (z - s c)) / s), q_{min}, q_{max})`,
  :math:`\hat x = (q - c) \cdot s + z`.

Inside the range the round trip is within half a step: :math:`|x - \hat x| \le s / 2` up to the
float32 roundings of :math:`r`, the product and the dequantization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import affine_qparams as aq
from jax_observers._src import granularity as gran
from jax_observers._src import numerics

ZPD = aq.ZeroPointDomain


def _per_block(layout: gran.BlockLayout, value, name: str) -> jax.Array:
  value = jnp.asarray(value)
  if value.size != int(np.prod(layout.state_shape, dtype=np.int64)):
    raise ValueError(
      f"{name} of shape {value.shape} does not hold one value per block: the blocks of an input "
      f"of shape {layout.shape} form a grid of shape {layout.state_shape}."
    )
  return layout.broadcast(value)


def quantize_blocks(x, layout, scale, zero_point, *, quant_range, zero_point_domain, dtype):
  """``x`` quantized to ``dtype`` with per-block ``scale``/``zero_point`` laid out by ``layout``."""
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
  v = layout.view(jnp.asarray(q))
  s = _per_block(layout, scale, "scale").astype(jnp.float32)
  if zero_point_domain == ZPD.INT:
    z = _per_block(layout, zero_point, "zero_point").astype(jnp.int32)
    out = (v.astype(jnp.int32) - z).astype(jnp.float32) * s
  elif zero_point_domain == ZPD.NONE:
    out = v.astype(jnp.float32) * s
  else:
    mid = np.float32((quant_range[0] + quant_range[1] + 1) / 2)
    z = _per_block(layout, zero_point, "zero_point").astype(jnp.float32)
    out = numerics.rounded((v.astype(jnp.float32) - mid) * s) + z
  return layout.unview(out).astype(dtype)


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
  x = aq.float_input(x, "quantize_affine")
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
