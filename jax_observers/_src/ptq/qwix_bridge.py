r"""The qwix bridge: a qwix provider that shows op inputs to observers, and the QParams mapping.

``ObservingProvider`` is a ``qwix.QuantizationProvider``: ``qwix.quantize_model`` installs it with
qwix's own interception, so it sees the ``dot_general``/``einsum``/``conv_general_dilated``/``dot``
calls, the rule matches and the op ids (``dot_general0``, ...) that ``qwix.PtqProvider`` sees. It
makes the same decisions as ``PtqProvider`` (qwix 0.1.8, ``providers/ptq.py``) about which operand
is an activation with a static scale, runs the float op, and keeps one observer state per
activation in the ``'observers'`` collection under qwix's quant_stats name (``dot_general0_lhs``).

``quant_stat`` maps an observer's QParams onto qwix's convention (``qarray.compute_scale_zero_point``
with ``averaging.SimpleMovingAverage``): qwix computes, from ``{count, sum_of_*}``,

.. math::
   s_{sym} = \frac{\mathrm{sum\_of\_absmax} / \mathrm{count}}{q_{max} + \tfrac12}, \qquad
   s_{asym} = \frac{(\mathrm{sum\_of\_max} - \mathrm{sum\_of\_min}) / \mathrm{count}}{q_{max} - q_{min}},
   \quad z = \mathrm{round}(q_{min} - \mathrm{min} / s_{asym})

on the qtype's integer grid :math:`[q_{min}, q_{max}]` (int8: :math:`[-128, 127]`). We store
``count = 1`` and the float32 ``absmax`` (or ``min``, ``max``) whose qwix scale is the observer's
scale bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src import averaging  # qwix 0.1.8: how quantize_params reads a quant_stat
from qwix._src.core import qarray
from qwix._src.providers.ptq import WithAux  # qwix 0.1.8: PTQ params carrying their HowToQuantize
from qwix._src.utils import flax_util  # qwix 0.1.8: the module/param helpers its providers use

from jax_observers._src.base import Observer, QParams, UniformObserver

COLLECTION = "observers"

# qwix's integer grids (numerics.get_symmetric_bound / get_asymmetric_bound); asymmetric: int8/int4.
_GRIDS = {"int8": (-128, 127), "int4": (-8, 7)} | {
  f"int{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (2, 3, 5, 6, 7)
}
_ASYMMETRIC_QTYPES = ("int8", "int4")


def qtype_name(qtype) -> str:
  """``jnp.int8``, ``"int8"`` -> ``"int8"``; a ValueError for qtypes without an integer grid."""
  name = qtype if isinstance(qtype, str) else np.dtype(qtype).name
  if name not in _GRIDS:
    raise ValueError(
      f"act_qtype={qtype!r}: jax_observers maps integer grids only; qwix qtypes with one are "
      f"{', '.join(sorted(_GRIDS))} (float8/nf4/mx formats have no zero point or integer grid)."
    )
  return name


def qwix_qparams(stat: Mapping, qtype) -> tuple[jax.Array, jax.Array | None]:
  """The ``(scale, zero_point)`` that ``qwix.quantize_params`` computes from one quant_stat."""
  calibration = averaging.SimpleMovingAverage().get_calibration(dict(stat))
  return qarray.compute_scale_zero_point(calibration, qtype)


def _search(start: np.ndarray, accept) -> np.ndarray:
  """Per element, the float32 nearest ``start`` (within 4 ulps) that ``accept`` takes, else ``start``.

  ``accept(candidate) -> bool array`` runs qwix's own numerics on the whole array, so each element
  is computed by the code path it will take in ``quantize_params`` (XLA:CPU divides a one-element
  array exactly but multiplies larger ones by the rounded reciprocal).
  """
  best, found = start, accept(start)
  up = down = start
  for _ in range(4):
    up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
    for cand in (up, down):
      hit = ~found & accept(cand)
      best, found = np.where(hit, cand, best), found | hit
  return best


def quant_stat(observer: UniformObserver, qparams: QParams, *, qtype, shape) -> dict:
  """``{count, sum_of_absmax}`` or ``{count, sum_of_min, sum_of_max}`` giving ``qparams`` in qwix.

  Args:
    observer: the UniformObserver config that produced ``qparams`` (its grid and qscheme).
    qparams: ``observer.calculate_qparams(state)``: per tensor, or per channel along
      ``observer.ch_axis``.
    qtype: qwix's ``act_qtype`` (``"int8"``, ``jnp.int8``, ``"int4"``, ...).
    shape: the shape of qwix's static scale (``dot_general0_lhs_scale``).

  Returns:
    A qwix quant_stat dict (float32 sums, int32 count) with sums of shape ``shape``.

  Raises:
    ValueError: the observer's grid is not qwix's grid for ``qtype`` (``reduce_range``, custom
      ranges), a per-channel scale does not fit ``shape``, or qwix has no asymmetric ``qtype``.
  """
  name = qtype_name(qtype)
  lo_q, hi_q = _GRIDS[name]
  qmin, qmax = observer.quant_range
  scale = _to_scale_shape(np.asarray(qparams.scale, np.float32), observer, shape)
  zp = _to_scale_shape(np.asarray(qparams.zero_point).astype(np.int64), observer, shape)
  label = f"{type(observer).__name__}(dtype={np.dtype(observer.dtype).name}, quant range "
  label += f"[{qmin}, {qmax}])"
  count = {"count": jnp.ones((), jnp.int32)}
  if observer.qscheme.is_symmetric:
    if np.any(qmin - zp != lo_q) or np.any(qmax - zp != hi_q):
      raise ValueError(
        f"{label} quantizes x to (q - zero_point) in [{qmin} - zp, {qmax} - zp]; qwix's symmetric "
        f"{name} grid is [{lo_q}, {hi_q}]. Use the full {name} range (no reduce_range)."
      )
    stat = lambda a: count | {"sum_of_absmax": jnp.asarray(a)}
    accept = lambda a: np.asarray(qwix_qparams(stat(a), qtype)[0]) == scale
    return stat(_search(scale * np.float32(hi_q + 0.5), accept))
  if name not in _ASYMMETRIC_QTYPES:
    raise ValueError(f"qwix has no asymmetric {name}; use a symmetric qscheme for {label}.")
  if qmax - qmin != hi_q - lo_q:
    raise ValueError(f"{label} has {qmax - qmin + 1} levels; qwix's {name} has {hi_q - lo_q + 1}.")
  lo = (qmin - zp).astype(np.float32) * scale  # <= 0: torch's zero point lies in [qmin, qmax]
  stat = lambda m: count | {"sum_of_min": jnp.asarray(lo), "sum_of_max": jnp.asarray(m)}

  def accept(m):
    s, z = qwix_qparams(stat(m), qtype)
    return (np.asarray(s) == scale) & (np.asarray(z).astype(np.int64) == zp + lo_q - qmin)

  return stat(_search(lo + np.float32(hi_q - lo_q) * scale, accept))


def _to_scale_shape(value: np.ndarray, observer: UniformObserver, shape) -> np.ndarray:
  shape = tuple(shape)
  if value.ndim == 0:
    return np.full(shape, value, value.dtype)
  if not observer.qscheme.is_per_channel:
    raise NotImplementedError(
      f"{type(observer).__name__} is per tensor but its state gives {value.shape} scales: a "
      "stacked state (nn.scan or nn.vmap over the layer). qwix 0.1.8 cannot PTQ scanned layers (see "
      "jax_observers.qwix), so neither can this bridge."
    )
  axis = observer.ch_axis % len(shape)
  expected = tuple(value.shape[0] if i == axis else 1 for i in range(len(shape)))
  if shape != expected:
    raise ValueError(
      f"{type(observer).__name__} gives {value.shape[0]} scales along ch_axis={observer.ch_axis}, "
      f"but qwix's static scale has shape {shape}: qwix keeps one scale per position of the "
      "non-contracting axes left after the mean over act_batch_axes."
    )
  return value.reshape(shape)


def observers_for_rules(rules, observer, observers) -> list[Observer | None]:
  """One observer per rule (None for rules without static activation scales)."""
  observers = dict(observers or {})
  unknown = set(observers) - {r.module_path for r in rules}
  if unknown:
    paths = [r.module_path for r in rules]
    raise ValueError(f"observers keys {sorted(unknown)} are no rule's module_path; rules: {paths}.")
  out = []
  for rule in rules:
    if not (rule.act_static_scale and rule.act_qtype is not None and rule.weight_qtype):
      out.append(None)
      continue
    obs = observers.get(rule.module_path, observer)
    if obs is None:
      raise ValueError(
        f"No observer for the rule with module_path={rule.module_path!r}: pass observer= or "
        "observers={module_path: observer}."
      )
    if not isinstance(obs, UniformObserver):
      raise TypeError(
        f"{type(obs).__name__} has no integer grid; qwix's static int scales need a jo "
        "UniformObserver (MinMaxObserver, the histogram calibrators, ...)."
      )
    qtype_name(rule.act_qtype)  # fail before calibrating on float8/nf4 act qtypes
    out.append(obs)
  return out


class ObservingProvider(qwix.QuantizationProvider):
  """A qwix provider that runs the float model and observes the PTQ-static activation inputs.

  Attributes:
    seen: ``{(module_path, act_name): observer}`` for every activation observed (trace time).
  """

  def __init__(self, rules: Sequence[qwix.QuantizationRule], observers: Sequence[Observer | None]):
    super().__init__(rules)
    self._observers = list(zip(self._rules, observers, strict=True))
    self.seen: dict[tuple[tuple[str, ...], str], Observer] = {}

  def _observer(self, rule) -> Observer | None:
    if rule is None or rule.weight_qtype is None:  # PtqProvider leaves this op in float.
      return None
    return next(obs for r, obs in self._observers if r == rule)

  def _observe(self, observer: Observer, name: str, x: jax.Array) -> None:
    module = flax_util.get_current_module()
    if not isinstance(module, nn.Module):
      raise TypeError(f"jax_observers.qwix calibrates flax.linen models; got {type(module)}.")
    x = jax.lax.stop_gradient(x)
    var = flax_util.get_or_create_variable(COLLECTION, name, lambda: observer.init(x))
    if module.is_mutable_collection(COLLECTION) and not module.is_initializing():
      var.value = observer.update(var.value, x)
    self.seen[(tuple(map(str, module.path)), name)] = observer

  def dot_general(
    self,
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
  ):
    rule, op_id = self._get_current_rule_and_op_id("dot_general")
    if (obs := self._observer(rule)) is not None:
      if not flax_util.find_param(rhs):  # PtqProvider: a non-param rhs is an activation.
        self._observe(obs, f"{op_id}_rhs", rhs)
      self._observe(obs, f"{op_id}_lhs", lhs)
    return jax.lax.dot_general(
      lhs,
      rhs,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
    )

  def einsum(
    self,
    einsum_str,
    *operands,
    precision=None,
    preferred_element_type=None,
    _dot_general=jax.lax.dot_general,
    out_sharding=None,
  ):
    rule, op_id = self._get_current_rule_and_op_id("einsum")
    if (obs := self._observer(rule)) is not None and len(operands) == 2:
      lhs, rhs = operands
      if not flax_util.find_param(rhs):
        self._observe(obs, f"{op_id}_rhs", rhs)
      self._observe(obs, f"{op_id}_lhs", lhs)
    return jnp.einsum(
      einsum_str,
      *operands,
      precision=precision,
      preferred_element_type=preferred_element_type,
      _dot_general=_dot_general,
      out_sharding=out_sharding,
    )

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    rule, op_id = self._get_current_rule_and_op_id("conv_general_dilated")
    if (obs := self._observer(rule)) is not None:
      self._observe(obs, f"{op_id}_lhs", lhs)  # PtqProvider: conv's rhs is always the weight.
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  def dot(self, a, b, precision=None, preferred_element_type=None, out_sharding=None):
    """``jnp.dot`` as PtqProvider sees it: a ``dot_general`` (qwix ``core/dot.py``)."""
    if a.ndim == 0 or b.ndim == 0:
      contract = ((), ())
    else:
      contract = ((a.ndim - 1,), (0 if b.ndim == 1 else b.ndim - 2,))
    return self.dot_general(
      a,
      b,
      (contract, ((), ())),
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
    )

  def get_intercept_map(self):
    return super().get_intercept_map() | {
      "jax.lax.conv_general_dilated": self.conv_general_dilated,
      "jax.lax.dot_general": self.dot_general,
      "jax.numpy.dot": self.dot,
      "jax.numpy.einsum": self.einsum,
    }


def static_scales(abstract_params: Mapping) -> dict[tuple[tuple[str, ...], str], tuple]:
  """``{(module_path, act_name): (scale shape, qtype, has zero point)}`` of a PTQ param tree."""
  flat = flax.traverse_util.flatten_dict(abstract_params)
  out = {}
  for path, leaf in flat.items():
    if isinstance(leaf, WithAux) and not isinstance(leaf.array, qwix.QArray):
      act = re.sub(r"_scale$", "", path[-1])
      has_zp = (*path[:-1], f"{act}_zero_point") in flat
      out[(tuple(path[:-1]), act)] = (tuple(leaf.array.shape), leaf.how.qtype, has_zp)
  return out
