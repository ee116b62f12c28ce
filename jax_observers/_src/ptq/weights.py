r"""Weight quantization over a params pytree: an observer per leaf, codes, qparams and SQNR.

Every leaf whose path matches a rule is observed once (``init``, ``update``, ``calculate_qparams``),
quantized with that observer's ``quantize`` and reported with its signal-to-quantization-noise ratio

.. math::
   \mathrm{SQNR}(w, \hat w) = 20 \log_{10} \frac{\lVert w \rVert_2}{\lVert w - \hat w \rVert_2}
   \ \mathrm{dB}, \qquad \hat w = \mathrm{dequantize}(\mathrm{quantize}(w))

(torchao's ``compute_error``; :math:`+\infty` when the round trip is exact). Observers with
``quantize``/``dequantize``: :class:`AffineQuantizedMinMaxObserver` (integer codes),
:class:`Float8Observer` (fp8 codes), :class:`MXObserver` (MX elements) and
:class:`Pow2ScaleObserver` around them.

Flax ``Dense`` kernels are ``(in, out)``: group along the input axis with ``PerBlock((g, 1))``
and ``MXObserver(axis=0)`` (torch's ``(out, in)`` weights use ``PerGroup(g)`` and ``axis=-1``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src.affine import granularity as gran
from jax_observers._src.affine import qparams as aq
from jax_observers._src.affine.observers import AffineQuantizedMinMaxObserver
from jax_observers._src.base import Observer, QParams, Quantizer
from jax_observers._src.readable import ReadableRepr

Rules = Callable[[str, Any], "Observer | None"] | Sequence[tuple[str, "Observer | None"]]


class QuantizedArray(ReadableRepr, struct.PyTreeNode, repr=False):
  """A quantized leaf: codes, per-block qparams and the observer that made them."""

  qvalue: jax.Array  # the weight's shape; integer codes (affine) or fp8 / MX element values.
  qparams: QParams  # one (scale, zero_point) per block, per stacked layer.
  observer: Observer = struct.field(pytree_node=False)
  stacked_axes: int = struct.field(pytree_node=False, default=0)  # leading layer axes (nn.scan)

  def dequantize(self) -> jax.Array:
    """The float32 weight the codes stand for."""
    return _over_layers(self.observer.dequantize, self.stacked_axes)(self.qvalue, self.qparams)


def _over_layers(fn, stacked_axes: int):
  """``fn`` vmapped over ``stacked_axes`` leading axes: each stacked layer on its own."""
  for _ in range(stacked_axes):
    fn = jax.vmap(fn)
  return fn


def path_name(path) -> str:
  """A pytree key path as ``'params/Dense_0/kernel'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def sqnr(w: jax.typing.ArrayLike, w_hat: jax.typing.ArrayLike) -> jax.Array:
  """``20 log10(||w|| / ||w - w_hat||)`` in dB (float32; inf for an exact round trip)."""
  w = jnp.asarray(w, jnp.float32)
  noise = jnp.linalg.norm(w - jnp.asarray(w_hat, jnp.float32))
  ratio = jnp.linalg.norm(w) / noise
  return jnp.where(noise == 0, jnp.float32(jnp.inf), 20 * jnp.log10(ratio))


def _quantize_layer(observer: Observer, w: jax.Array):
  state = observer.update(observer.init(w), w)
  qparams = observer.calculate_qparams(state)
  q = observer.quantize(w, qparams)
  return q, qparams, observer.dequantize(q, qparams)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _quantize_leaf(observer: Observer, stacked_axes: int, w: jax.Array):
  q, qparams, w_hat = _over_layers(functools.partial(_quantize_layer, observer), stacked_axes)(w)
  per_layer = _over_layers(sqnr, stacked_axes)(w, w_hat)
  return q, qparams, sqnr(w, w_hat), per_layer


def quantize_array(
  observer: Observer, w: jax.typing.ArrayLike, *, stacked_axes: int = 0
) -> tuple[QuantizedArray, jax.Array]:
  """``w`` observed and quantized by ``observer``; returns the leaf and its SQNR (dB).

  With ``stacked_axes=k`` the first ``k`` axes stack independent layers (``nn.scan`` kernels are
  ``(L, in, out)``): each layer is observed and quantized on its own, never in one shared range.
  """
  return _quantize(observer, w, stacked_axes)[:2]


def _quantize(observer: Observer, w, stacked_axes: int):
  if not isinstance(observer, Quantizer):
    raise TypeError(
      f"{type(observer).__name__} cannot quantize weights: it is no jo.Quantizer (no "
      "quantize/dequantize); use a uniform observer (MinMax, PerChannelMinMax, Histogram, ...), "
      "AffineQuantizedMinMaxObserver, Float8Observer, MXObserver or Pow2ScaleObserver."
    )
  w = jnp.asarray(w)
  if isinstance(stacked_axes, bool) or not isinstance(stacked_axes, int):
    raise TypeError(f"stacked_axes={stacked_axes!r} must be an int.")
  if not 0 <= stacked_axes < w.ndim:
    raise ValueError(
      f"stacked_axes={stacked_axes} must be in [0, {w.ndim}) for a weight of shape {w.shape}."
    )
  q, qparams, db, per_layer = _quantize_leaf(observer, stacked_axes, w)
  leaf = QuantizedArray(qvalue=q, qparams=qparams, observer=observer, stacked_axes=stacked_axes)
  return leaf, db, per_layer


def select_observer(rules: Rules, name: str, leaf, default: Observer | None = None):
  """The observer for the leaf at ``name``: ``rules(name, leaf)``, or the first ``(pattern,
  observer)`` whose regex ``re.search``-es ``name`` (None skips the leaf), else ``default``."""
  return _select(rules, name, leaf, default)[0]


def _select(rules: Rules, name: str, leaf, default, stacked_axes=0) -> tuple[Observer | None, int]:
  """``(observer, stacked_axes)`` for a leaf; a rule ``(pattern, observer, k)`` sets ``k``."""
  found = rules(name, leaf) if callable(rules) else None
  if not callable(rules):
    found = default
    for rule in rules:
      if len(rule) not in (2, 3):
        raise ValueError(
          f"a rule is (pattern, observer) or (pattern, observer, stacked_axes); got {rule!r}."
        )
      if re.search(rule[0], name):
        found = rule[1]
        if len(rule) == 3:
          return found, rule[2]
        break
  return found, _stacked_axes_for(stacked_axes, name)


def _stacked_axes_for(stacked_axes, name: str) -> int:
  if isinstance(stacked_axes, int):
    return stacked_axes
  for pattern, k in stacked_axes:
    if re.search(pattern, name):
      return k
  return 0


def quantize_params(params, rules: Rules, *, default: Observer | None = None, stacked_axes=0):
  """Quantizes the leaves of ``params`` that ``rules`` select; the rest pass through unchanged.

  Args:
    params: a pytree of float arrays (e.g. Flax ``variables['params']``).
    rules: a callable ``(path, leaf) -> observer or None`` or a sequence of
      ``(regex, observer or None)`` matched against paths like ``'Dense_0/kernel'``; a rule
      ``(regex, observer, k)`` also says the leaf stacks ``k`` layers in front.
    default: the observer for leaves no pattern matches (None: leave them as they are).
    stacked_axes: leading axes that stack layers (``nn.scan`` / ``nnx.scan`` kernels are
      ``(L, in, out)``: 1): an int for every leaf, or ``(regex, k)`` pairs (first match, else 0).
      Each stacked layer gets its own qparams; no range is shared across layers.

  Returns:
    ``(quantized, report)``: ``params`` with each selected leaf replaced by a
    :class:`QuantizedArray`, and a dict from path to SQNR in dB; a stacked leaf also reports each
    layer, as ``'path[i]'`` (``'path[i,j]'`` for two stacked axes).

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (256, 8)),
    ...                       "bias": jnp.zeros(8)}}
    >>> quantized, report = jo.quantize_params(params, jo.int4_weight_rules(group_size=128))
    >>> quantized["Dense_0"]["kernel"].qvalue.dtype, quantized["Dense_0"]["bias"].dtype
    (dtype(int4), dtype('float32'))
    >>> quantized["Dense_0"]["kernel"].qparams.scale.shape, 15 < float(report["Dense_0/kernel"]) < 25
    ((2, 8), True)
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out, report = [], {}
  for path, leaf in leaves:
    name = path_name(path)
    observer, axes = _select(rules, name, leaf, default, stacked_axes)
    if observer is None:
      out.append(leaf)
      continue
    quantized, db, per_layer = _quantize(observer, leaf, axes)
    out.append(quantized)
    report[name] = db
    for index in np.ndindex(*per_layer.shape) if axes else ():
      report[f"{name}[{','.join(map(str, index))}]"] = per_layer[index]
  return jax.tree_util.tree_unflatten(treedef, out), report


def dequantize_params(quantized):
  """``quantized`` with every :class:`QuantizedArray` replaced by its float32 weight."""
  return jax.tree_util.tree_map(
    lambda leaf: leaf.dequantize() if isinstance(leaf, QuantizedArray) else leaf,
    quantized,
    is_leaf=lambda leaf: isinstance(leaf, QuantizedArray),
  )


def int4_weight_rules(
  group_size: int = 128, *, mapping_type: aq.MappingType = aq.MappingType.SYMMETRIC
) -> list[tuple[str, Observer | None]]:
  """Rules for weight-only int4: Flax kernels ``(..., in, out)`` in groups of ``group_size`` input
  features (a partial last group when ``group_size`` does not divide ``in``), biases skipped."""
  dtype = jnp.int4 if mapping_type != aq.MappingType.ASYMMETRIC else jnp.uint4
  kernel = AffineQuantizedMinMaxObserver(
    mapping_type=mapping_type,
    target_dtype=dtype,
    granularity=gran.PerBlock((group_size, 1)),
    pad_partial_blocks=True,
  )
  return [(r"(^|/)bias$", None), (r"(^|/)kernel$", kernel)]
