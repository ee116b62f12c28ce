r"""LSQ / LSQ+ fake quantization with learnable scale and zero point (torch's ``_fake_quantize_learnable_*``).

The forward pass is :func:`fake_quantize_per_tensor_affine` (per-channel likewise) with the zero point
rounded half-to-even and clamped. The backward pass follows torch's CPU kernels, per element with
:math:`s` = scale, :math:`g` = ``grad_factor``, :math:`z_b` the backward zero point and
:math:`q = \mathrm{rne}(z_b + x \cdot \mathrm{rn}(1/s))`:

.. math::
   \begin{array}{llll}
   & \partial x & \partial s & \partial z \\
   q_{min} \le q \le q_{max}: & \delta & \delta\,\mathrm{fma}(q - z_b, s, -x)\,\tfrac{1}{s}\,g & 0 \\
   q < q_{min}: & 0 & \delta\,(q_{min} - z_b)\,g & -\delta\, s\, g \\
   q > q_{max}: & 0 & \delta\,(q_{max} - z_b)\,g & -\delta\, s\, g
   \end{array}

(:math:`\delta` the incoming gradient; products left to right, each rounded to float32 except the
FMA, as torch's AVX2/AVX512 kernels contract :math:`(q - z_b) s - x`). ``dscale`` and
``dzero_point`` are the float32 sums over all elements (per tensor) or all axes but ``axis``.

**Zero-point mismatch (torch E17).** Per tensor, torch's forward uses :math:`\mathrm{rne}(z)` but the
backward uses :math:`z_b = \mathrm{trunc}(\mathrm{clip}(z + 0.5))`, so for :math:`z = 2.5` the output is
computed with 2 and the gradients with 3 (negative zero points differ more often). That is the
default here; ``consistent_zero_point=True`` uses :math:`\mathrm{rne}(z)` in both passes. Per channel
torch rounds half-to-even in both passes.

NaN inputs count as below the range (torch's x86 int64 cast); +inf and values past int64 count as
above it, consistently with the forward pass (torch's x86 cast puts them below).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jax_observers._src import compiled, numerics
from jax_observers._src.config import float_input
from jax_observers._src.fake_quant import ops


def _check(x, quant_min, quant_max, grad_factor, fn):
  x = float_input(x, fn)
  quant_min, quant_max = ops.check_quant_range(quant_min, quant_max)
  if not quant_min <= 0 <= quant_max:
    raise ValueError(
      f"{fn}: the range [quant_min, quant_max] = [{quant_min}, {quant_max}] must include 0."
    )
  if isinstance(grad_factor, bool) or not isinstance(grad_factor, (int, float, np.floating)):
    raise TypeError(f"{fn}: grad_factor={grad_factor!r} must be a Python float.")
  return x, quant_min, quant_max, float(grad_factor)


def _clip_float(z, quant_min, quant_max):
  """torch's ``min(max(z, float(qmin)), float(qmax))`` (NaN stays NaN)."""
  return jnp.minimum(jnp.maximum(z, np.float32(quant_min)), np.float32(quant_max))


def _zero_points(zero_point, quant_min, quant_max, per_channel: bool, consistent: bool):
  """Forward int32 zero point and backward float32 zero point ``z_b``."""
  z = zero_point.astype(jnp.float32)
  forward = _clip_float(jnp.round(z), quant_min, quant_max)
  if per_channel or consistent:
    backward = forward
  else:  # _get_zero_point_from_tensor(is_forward=False): clamp(z + 0.5f), then the int64 cast.
    backward = jnp.trunc(_clip_float(z + np.float32(0.5), quant_min, quant_max))
  return forward.astype(jnp.int32), backward


def _coefficients(x, scale, z_b, quant_min, quant_max, grad_factor, per_channel):
  """Per-element factors of torch's backward, ``scale``/``z_b`` broadcast against ``x``:

  ``dx = dy * mask``, ``dscale = ((dy * k2) * k1) * g`` (inside: ``k2 = fma(q - z_b, s, -x)``,
  ``k1 = 1/s``; outside: ``k2 = q_{min|max} - z_b``, ``k1 = 1``) and ``dzero = ((-dy) * s) * g``
  outside the range, 0 inside: each product rounded as torch rounds it.
  """
  inv = ops._inverse(scale)
  q_f = jnp.round(numerics.fma(x, inv, z_b))
  codes = ops._clip_codes(q_f, quant_min, quant_max)
  inside = ops._in_range(q_f, quant_min, quant_max, exact=True)
  below = ~inside & ~(q_f > ops._bounds(quant_min, quant_max, q_f.dtype)[1])  # NaN is below
  z_int = z_b.astype(jnp.int32)
  if per_channel:  # int64 - float in C++: both rounded to float32 first
    diff = codes.astype(jnp.float32) - z_b
    small = np.float32(quant_min) - z_b
    big = np.float32(quant_max) - z_b
  else:  # int64 arithmetic, then one conversion
    diff = numerics.int_sub_to_float32(codes, z_int)
    small = numerics.int_sub_to_float32(np.int32(quant_min), z_int)
    big = numerics.int_sub_to_float32(np.int32(quant_max), z_int)
  shape = x.shape
  k2 = jnp.where(
    inside, numerics.fma(diff, scale, -x), jnp.broadcast_to(jnp.where(below, small, big), shape)
  )
  k1 = jnp.where(inside, jnp.broadcast_to(inv, shape), np.float32(1.0))
  s = jnp.where(inside, np.float32(1.0), jnp.broadcast_to(scale, shape))
  return inside, lax.optimization_barrier((k2, k1, s))


def _element_grads(x, dy, scale, z_b, quant_min, quant_max, grad_factor, per_channel):
  """torch's per-element ``(dx, dscale, dzero_point)``; ``scale``/``z_b`` broadcast against ``x``."""
  inside, (k2, k1, s) = _coefficients(x, scale, z_b, quant_min, quant_max, grad_factor, per_channel)
  g = np.float32(grad_factor)
  dx = ops.times_mask(dy, inside)
  dscale = ((dy * k2) * k1) * g
  dzero = jnp.where(inside, jnp.zeros_like(dy), ((-dy) * s) * g)
  return dx, dscale, dzero


def _sum(values, axes):
  """A float32 sum that, like torch's, starts from +0.0 (a sum of -0.0 terms is +0.0)."""
  total = jnp.sum(values, axis=axes)
  return jnp.where(total == 0, jnp.zeros_like(total), total)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _learnable(x, scale, zero_point, spec):
  return _learnable_fwd(x, scale, zero_point, spec)


def _learnable_fwd(x, scale, zero_point, spec):
  axis, quant_min, quant_max, _, consistent = spec
  per_channel = axis is not None
  s = scale.astype(jnp.float32)
  if not per_channel:
    s = s.reshape(())
  z_fwd, _ = _zero_points(zero_point, quant_min, quant_max, per_channel, consistent)
  if not per_channel:
    z_fwd = z_fwd.reshape(())
  shape = ops._channel_shape(x, axis) if per_channel else ()
  spec3 = (axis, quant_min, quant_max)
  return ops._fake_quant_fwd(x, s.reshape(shape), z_fwd.reshape(shape), spec3)[0]


def _learnable_jvp(spec, primals, tangents):
  r"""torch's LSQ backward written as a JVP whose transpose (``jax.grad``) is that backward.

  With :math:`\dot x, \dot s, \dot z` the tangents (broadcast along the channels),
  :math:`\dot y = \dot x\,m + ((\dot s\, g)\, k_1)\, k_2 - (([\text{outside}]\,\dot z\, g)\, s)`;
  JAX transposes each chain of products in reverse order, so the cotangent of ``scale`` is
  :math:`\sum ((\delta\, k_2)\, k_1)\, g`, torch's rounding per element (:func:`_coefficients`).
  Symbolic-zero tangents are skipped (an inf ``x`` must not make ``0 * k_2`` NaN).
  """
  axis, quant_min, quant_max, grad_factor, consistent = spec
  x, scale, zero_point = primals
  x_t, s_t, z_t = (None if type(t) is SymbolicZero else t for t in tangents)
  y = _learnable_fwd(x, scale, zero_point, spec)
  per_channel = axis is not None
  _, z_b = _zero_points(zero_point, quant_min, quant_max, per_channel, consistent)
  shape = ops._channel_shape(x, axis) if per_channel else ()
  s = scale.astype(jnp.float32).reshape(shape)
  xf = x.astype(jnp.float32)
  inside, (k2, k1, s_out) = _coefficients(
    xf, s, z_b.reshape(shape), quant_min, quant_max, grad_factor, per_channel
  )
  g = np.float32(grad_factor)
  wide = lambda t: jnp.broadcast_to(t.astype(jnp.float32).reshape(shape), x.shape)
  dy = jnp.zeros(x.shape, jnp.float32)
  if x_t is not None:
    dy = ops.times_mask(x_t.astype(jnp.float32), inside)
  if s_t is not None:
    # Zero terms first become +0.0 (the select's transpose is last): torch's sums start from +0.0.
    terms = jnp.where(k2 == 0, jnp.zeros(x.shape, jnp.float32), wide(s_t))
    dy = dy + ((terms * g) * k1) * k2
  if z_t is not None:
    # The select comes first, so its transpose comes last: +0.0 inside, as torch's zeros.
    outside = jnp.where(inside, jnp.zeros(x.shape, jnp.float32), wide(z_t))
    dy = dy + ((outside * g) * s_out) * np.float32(-1.0)
  return y, dy.astype(x.dtype)


_learnable.defjvp(_learnable_jvp, symbolic_zeros=True)


@compiled.eager_compiled_function("x", "scale", "zero_point")
def fake_quantize_learnable_per_tensor_affine(
  x, scale, zero_point, quant_min, quant_max, grad_factor=1.0, *, consistent_zero_point=False
) -> jax.Array:
  r"""LSQ+ fake quantization with one learnable ``scale`` and ``zero_point`` (see the module docstring).

  Args:
    x: a floating-point array (the backward pass computes in float32).
    scale: a one-element float array (the trainable step size).
    zero_point: a one-element float array (the trainable offset).
    quant_min, quant_max: the static range; it must include 0.
    grad_factor: multiplies the scale and zero-point gradients (LSQ's :math:`1/\sqrt{N q_{max}}`).
    consistent_zero_point: compute the gradients with the forward's rounded zero point instead of
      torch's ``trunc(z + 0.5)``.

  Returns:
    The fake-quantized ``x``; differentiable in ``x``, ``scale`` and ``zero_point``.

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> x, s, z = jnp.array([3.0, 0.0]), jnp.array([0.2]), jnp.array([2.5])
    >>> f = lambda x, s, z: jo.fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15).sum()
    >>> [g.tolist() for g in jax.grad(f, argnums=(0, 1, 2))(x, s, z)]  # torch E17
    [[0.0, 1.0], [12.0], [-0.20000000298023224]]
  """
  fn = "fake_quantize_learnable_per_tensor_affine"
  x, quant_min, quant_max, grad_factor = _check(x, quant_min, quant_max, grad_factor, fn)
  scale, zero_point = jnp.asarray(scale), jnp.asarray(zero_point)
  for name, v in (("scale", scale), ("zero_point", zero_point)):
    if v.size != 1 or not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"{fn}: {name} must be a one-element float array; got {v.dtype}{v.shape}.")
  spec = (None, quant_min, quant_max, grad_factor, bool(consistent_zero_point))
  return _learnable(x, scale, zero_point, spec)


@compiled.eager_compiled_function("x", "scale", "zero_point")
def fake_quantize_learnable_per_channel_affine(
  x, scale, zero_point, axis, quant_min, quant_max, grad_factor=1.0
) -> jax.Array:
  r"""LSQ+ fake quantization with a learnable ``scale``/``zero_point`` per slice along ``axis``.

  Args:
    x: a floating-point array.
    scale, zero_point: float arrays of shape ``(x.shape[axis],)``.
    axis: the channel axis (negative values count from the end).
    quant_min, quant_max: the static range; it must include 0.
    grad_factor: multiplies the scale and zero-point gradients.

  Returns:
    The fake-quantized ``x``; differentiable in ``x``, ``scale`` and ``zero_point``.

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> x = jnp.array([[0.3, 5.0], [-0.1, 0.2]])
    >>> s, z = jnp.array([0.25, 0.1]), jnp.array([0.0, 1.0])
    >>> f = lambda s: jo.fake_quantize_learnable_per_channel_affine(x, s, z, 0, -8, 7).sum()
    >>> jax.grad(f)(s).tolist()
    [6.800000190734863, 0.0]
  """
  fn = "fake_quantize_learnable_per_channel_affine"
  x, quant_min, quant_max, grad_factor = _check(x, quant_min, quant_max, grad_factor, fn)
  axis, scale, zero_point = ops.per_channel_qparams(
    x, jnp.asarray(scale), jnp.asarray(zero_point, jnp.float32), axis, quant_min, quant_max, fn
  )
  channels = (x.shape[axis],)
  spec = (axis, quant_min, quant_max, grad_factor, False)
  return _learnable(x, scale.reshape(channels), zero_point.reshape(channels), spec)
