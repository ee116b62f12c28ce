r"""Calibrate with jax_observers, deploy with qwix: any jo observer as qwix's static activation range.

`qwix <https://github.com/google/qwix>`_ (0.1.8, the ``qwix`` extra) turns a Flax model's
``dot_general``/``einsum``/``conv`` into real int8 ops without editing the model. Its static
activation scales come from ``absmax``/``minmax``/``rms``/``fixed`` ranges averaged over batches in
a ``'quant_stats'`` collection. :func:`calibrate` replaces that statistic with any jax_observers
observer (MinMax, histogram percentile/MSE/entropy, ...) and returns ``quant_stats`` that
``qwix.quantize_params`` turns into the PTQ model's scales:

1. the model runs in float under a ``qwix.QuantizationProvider`` installed by
   ``qwix.quantize_model``, so the observers see exactly the op inputs, rule matches and op ids
   (``Dense_0/dot_general0_lhs``) of ``qwix.PtqProvider``: the ``lhs`` of every matched op, the
   ``rhs`` when it is not a param, for rules with ``weight_qtype``, ``act_qtype`` and
   ``act_static_scale=True``. One jitted ``apply`` per batch; observer states live in the
   ``'observers'`` collection.
2. each state's ``calculate_qparams`` is mapped onto qwix's convention, exactly.

The provider is public qwix API (``QuantizationProvider``, its ``_get_current_rule_and_op_id`` hook
for subclasses); to decide what is a weight and where a state lives it calls the helpers qwix's own
providers call (``qwix._src.utils.flax_util``), and it checks every mapped scale with qwix's own
``averaging``/``qarray.compute_scale_zero_point``. Those are private to qwix, hence the pin
``qwix==0.1.8``; qwix's model code is never patched.

**The mapping.** qwix reads ``{count, sum_of_absmax}`` (or ``sum_of_min``/``sum_of_max``) as the
mean range ``r = sum / count`` and computes, on the qtype's grid :math:`[q_{min}, q_{max}]`
(int8: :math:`[-128, 127]`, int4: :math:`[-8, 7]`):

.. math::
   \text{symmetric: } s = \frac{r_{absmax}}{q_{max} + 1/2}, \qquad
   \text{asymmetric: } s = \frac{r_{max} - r_{min}}{q_{max} - q_{min}},\;
   z = \mathrm{round}\!\left(q_{min} - \frac{r_{min}}{s}\right).

torch's symmetric scale is :math:`\max(|m|, |M|) / ((Q_{max} - Q_{min}) / 2)`: for the full int8
range that is the same 127.5 as qwix's :math:`q_{max} + 1/2`. For an observer's QParams
:math:`(s, Z)` on its grid :math:`[Q_{min}, Q_{max}]` we store ``count = 1`` and

* symmetric qschemes: ``absmax`` :math:`= a`, the float32 nearest :math:`127.5\,s` for which
  qwix's own ``compute_scale_zero_point`` returns :math:`s` (searched ulp by ulp, on the scale's
  real shape); the observer's grid :math:`[Q_{min} - Z, Q_{max} - Z]` must be qwix's (qint8 with
  ``Z = 0`` and quint8 with ``Z = 128`` both are; ``reduce_range`` is not, and raises);
* affine qschemes: ``min`` :math:`= (Q_{min} - Z)\,s` and ``max`` the float32 nearest
  ``min + 255 s`` for which qwix returns :math:`s` and the zero point :math:`Z + q_{min} - Q_{min}`
  (``Z - 128`` for quint8). The rule must say ``act_calibration_method="minmax"`` so the PTQ model
  has a ``*_zero_point`` param (with ``"absmax"`` qwix would drop the zero point, so that raises).

Zero points always map exactly. Scales map bit for bit whenever qwix's arithmetic can produce them
at all. It cannot always: on XLA:CPU (jax 0.10.2) qwix's eager float32 divisions by 127.5 and 255
run as multiplications by the rounded reciprocal, except for a one-element ``absmax``. So:

==========================  =====================  ===========================================
qscheme                     qwix scale shape       qwix scale == ``calculate_qparams().scale``
==========================  =====================  ===========================================
symmetric                   one element ``(1,1)``  always (torch's ``amax / 127.5`` is qwix's)
symmetric                   several (per position) bit for bit, else 1 ulp off (~0.5% of scales)
affine                      any                    bit for bit, else 1 ulp off (0.4%-2.5%)
==========================  =====================  ===========================================

"1 ulp off" is the nearest scale qwix can represent (a relative error below 1.2e-7), for scales
that no ``quant_stats`` can make qwix compute. The quantized values then agree up to ties: torch
rounds ``x / s`` and adds ``Z``; qwix rounds ``x / s + z`` (half to even), which can differ by one
code when ``x / s`` is exactly half-way and ``z`` is odd.

**Granularity.** qwix keeps one activation scale per position of the op input's non-contracting
axes after a mean over ``act_batch_axes`` (default ``(0,)``): for a ``(B, K)`` Dense input the
scale is ``(1, 1)``, for ``(B, S, K)`` it is ``(1, S, 1)``, per sequence position. A per-tensor
observer's scale is broadcast to that shape (one scale for every position, as qwix's own
``act_batch_axes=(0, 1)``); a per-channel observer (``ch_axis``) fills it when its channels are
that axis, e.g. ``ch_axis=1`` for ``(1, S, 1)``. Observers see the raw inputs: qwix's statistic is
a *mean over batches of per-example* absmax, jo's are torch's (a running min/max, a histogram over
every value). qwix's own ``QtProvider`` calibration runs the quantized model, so its downstream
inputs carry upstream quantization error; :func:`calibrate` observes the float model, as torch's
prepare/convert does.

**What qwix 0.1.8 cannot do** (stated, not worked around):

* ``nn.scan``'ed layers in its PTQ path. ``QtProvider`` calibration of a scanned block (with
  ``variable_axes={"params": 0, "quant_stats": 0}``) stacks the stats to ``count: (L,)``, and
  ``qwix.quantize_params`` then fails in ``if quant_stat['count'] == 0:`` with
  ``ValueError: The truth value of an array with more than one element is ambiguous. Use a.any()
  or a.all()``. Even weight-only PTQ (``weight_qtype="int8"``, no activation rule) of the scanned
  block fails in ``ptq.apply`` with ``ValueError: scan got `length` argument of 3 which disagrees
  with leading axis sizes [3, 3, 1].`` (``quantize_params`` gives the stacked kernel a per-layer
  scale without the layer axis). Scanned layers have no PTQ in qwix, so :func:`calibrate` raises
  ``NotImplementedError`` for them rather than patching qwix's internals.
* histogram, percentile, MSE or entropy ranges, running min/max: what this module adds.
* asymmetric activations other than int8/int4, and integer grids for float8/nf4/mx qtypes (they
  have no zero point): those raise here.
* NNX models are not supported by :func:`calibrate` (linen only).

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, qwix, jax_observers as jo
  >>> import jax_observers.qwix
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  >>> x = jax.random.normal(jax.random.key(0), (16, 4))
  >>> params = model.init(jax.random.key(1), x)["params"]
  >>> rules = [qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
  >>> obs = jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
  >>> quant_stats = jo.qwix.calibrate(model, rules, params, [x[:8], x[8:]], observer=obs)
  >>> ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  >>> abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
  >>> qparams = qwix.quantize_params(params, abstract, quant_stats)
  >>> scale = qparams["layers_0"]["dot_general0_lhs_scale"].array
  >>> bool(scale[0, 0] == obs.calculate_qparams(obs.update(obs.init(x), x)).scale)
  True
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax

try:
  import qwix
except ImportError as e:  # the optional ``qwix`` extra
  raise ImportError(
    "jax_observers.qwix needs qwix 0.1.8: pip install 'jax_observers[qwix]'."
  ) from e

from jax_observers._src.base import Observer, QParams, UniformObserver
from jax_observers._src.ptq import qwix_bridge

COLLECTION = qwix_bridge.COLLECTION


def observe(
  model: nn.Module,
  rules: Sequence[qwix.QuantizationRule],
  params: Any,
  batches: Iterable[Any],
  *,
  observer: Observer | None = None,
  observers: Mapping[str, Observer] | None = None,
  model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
  """Runs ``batches`` through ``model`` in float, observing qwix's static activation inputs.

  Args:
    model: the float ``flax.linen`` model (not edited).
    rules: the ``qwix.QuantizationRule``\\ s of the PTQ model, in qwix's order of precedence.
    params: the float params.
    batches: each batch is the model's positional input: an array, or a tuple of arrays.
    observer: the observer for every rule with ``act_static_scale=True``.
    observers: ``{rule.module_path: observer}``, overriding ``observer`` per rule (rules that share
      a ``module_path`` share its observer).
    model_kwargs: keyword arguments for every model call, held static (``{"train": False}``).

  Returns:
    ``(states, configs)``: the observer states and the observer configs, each keyed
    ``{*module_path: {act_name: ...}}`` like ``quant_stats`` (``{"Dense_0": {"dot_general0_lhs": ...}}``).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, qwix, jax_observers as jo
    >>> import jax_observers.qwix
    >>> model, x = nn.Dense(3), jnp.linspace(-2.0, 1.0, 8).reshape(2, 4)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> rules = [qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    >>> states, configs = jo.qwix.observe(model, rules, params, [x], observer=jo.MinMaxObserver())
    >>> float(states["dot_general0_lhs"].min_val), float(states["dot_general0_lhs"].max_val)
    (-2.0, 1.0)

  Raises:
    ValueError: no observer for a static rule, an unknown ``observers`` key, no batches.
    TypeError: an observer without an integer grid, or a model that is not linen.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"jax_observers.qwix calibrates flax.linen models; got {type(model).__name__}.")
  provider = qwix_bridge.ObservingProvider(
    rules, qwix_bridge.observers_for_rules(rules, observer, observers)
  )
  observing = qwix.quantize_model(model, provider)
  kwargs = dict(model_kwargs or {})

  @jax.jit
  def init(args):  # only observer.init values leave: XLA drops the forward, a cheap compile
    return observing.init(jax.random.key(0), *args, **kwargs)[COLLECTION]

  @jax.jit
  def step(params, states, args):
    variables = {"params": params, COLLECTION: states}
    return observing.apply(variables, *args, mutable=[COLLECTION], **kwargs)[1][COLLECTION]

  states = None
  for batch in batches:
    try:
      states = init(_args(batch)) if states is None else states
      states = step(params, states, _args(batch))
    except flax.errors.ScopeCollectionNotFound as e:
      raise NotImplementedError(
        "An op qwix quantizes runs under a lifted transform (nn.scan, nn.vmap) that does not carry "
        f"the {COLLECTION!r} collection. qwix 0.1.8 cannot PTQ scanned layers (see "
        "jax_observers.qwix), so jax_observers.qwix does not calibrate them."
      ) from e
  if states is None:
    raise ValueError("batches is empty: calibration needs at least one batch.")
  configs: dict = {}
  for (path, name), obs in provider.seen.items():
    _nested(configs, path)[name] = obs
  return states, configs


def calibrate(
  model: nn.Module,
  rules: Sequence[qwix.QuantizationRule],
  params: Any,
  batches: Iterable[Any],
  *,
  observer: Observer | None = None,
  observers: Mapping[str, Observer] | None = None,
  model_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """qwix ``quant_stats`` whose static scales are the observers' ``calculate_qparams``.

  Args:
    model: the float ``flax.linen`` model; ``qwix.quantize_model(model, qwix.PtqProvider(rules))``
      is the model the result is for.
    rules: the PTQ rules (``weight_qtype``, ``act_qtype``, ``act_static_scale=True``).
    params: the float params.
    batches: the calibration batches (arrays, or tuples of the model's positional args).
    observer: one observer config for every static rule.
    observers: ``{rule.module_path: observer}``, overriding ``observer`` per rule.
    model_kwargs: keyword arguments for every model call, held static (``{"train": False}``).

  Returns:
    ``{*module_path: {act_name: {"count", "sum_of_absmax"}}}`` (``sum_of_min``/``sum_of_max`` for
    affine observers), ready for ``qwix.quantize_params(params, abstract_ptq_params, quant_stats)``.

  Raises:
    ValueError: an activation qwix quantizes statically that no batch reached, an affine observer
      on an ``absmax`` rule (or symmetric on ``minmax``), a grid qwix cannot express (see the
      module doc), no observer for a static rule.
  """
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError("batches is empty: calibration needs at least one batch.")
  batches = itertools.chain([first], batches)
  kw = {"observer": observer, "observers": observers, "model_kwargs": model_kwargs}
  states, configs = observe(model, rules, params, batches, **kw)
  return to_quant_stats(model, rules, states, configs, *_args(first), model_kwargs=model_kwargs)


def to_quant_stats(
  model: nn.Module,
  rules: Sequence[qwix.QuantizationRule],
  states: dict,
  configs: dict,
  *args,
  model_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """qwix ``quant_stats`` from :func:`observe`'s ``(states, configs)`` (the second half of calibrate).

  Args:
    model: the float model.
    rules: the PTQ rules.
    states: the observer states from :func:`observe`.
    configs: the observer configs from :func:`observe`.
    *args: a sample input (one batch's positional args), to trace qwix's PTQ model for its
      static scales' shapes and qtypes.
    model_kwargs: keyword arguments for the model call, as in :func:`observe`.

  Returns:
    The quant_stats, as :func:`calibrate`.
  """
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  init = functools.partial(ptq.init, **(model_kwargs or {}))
  abstract = jax.eval_shape(init, jax.random.key(0), *args)["params"]
  out, compiled = {}, {}
  for (path, name), (shape, qtype, has_zp) in qwix_bridge.static_scales(abstract).items():
    where = "/".join((*path, name))
    try:
      obs, state = _get(configs, path)[name], _get(states, path)[name]
    except KeyError:
      raise ValueError(f"qwix quantizes {where} statically but no batch reached it.") from None
    if obs.qscheme.is_symmetric == has_zp:
      method = "absmax" if obs.qscheme.is_symmetric else "minmax"
      raise ValueError(
        f"{where}: {type(obs).__name__} with qscheme={obs.qscheme.value!r} needs the rule's "
        f"act_calibration_method={method!r}, so that qwix's PTQ model "
        f"{'has no' if obs.qscheme.is_symmetric else 'has a'} zero point."
      )
    if obs not in compiled:  # obs is static (closed over): one compile per config, not per site
      compiled[obs] = jax.jit(obs.calculate_qparams)
    qparams = compiled[obs](state)
    _nested(out, path)[name] = quant_stat(obs, qparams, qtype=qtype, shape=shape)
  return out


def quant_stat(observer: UniformObserver, qparams: QParams, *, qtype, shape) -> dict:
  """One qwix quant_stat (``{count, sum_of_*}``) whose qwix scale is ``qparams.scale`` exactly.

  Args:
    observer: the UniformObserver config behind ``qparams`` (its grid and qscheme).
    qparams: ``observer.calculate_qparams(state)``.
    qtype: qwix's ``act_qtype`` (``"int8"`` or ``jnp.int8``, ``"int4"``, ...).
    shape: the shape of qwix's static scale, e.g. ``(1, 1)`` for a ``(B, K)`` Dense input.

  Returns:
    The quant_stat dict; see the module doc for the exact rule.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> import jax_observers.qwix
    >>> obs = jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
    >>> qp = obs.calculate_qparams(obs.update(obs.init(jnp.ones(3)), jnp.array([-3.0, 1.0])))
    >>> stat = jo.qwix.quant_stat(obs, qp, qtype="int8", shape=(1, 1))
    >>> float(stat["sum_of_absmax"][0, 0]), bool(stat["sum_of_absmax"][0, 0] / 127.5 == qp.scale)
    (3.0, True)
  """
  return qwix_bridge.quant_stat(observer, qparams, qtype=qtype, shape=shape)


def _args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _nested(tree: dict, path: Sequence[str]) -> dict:
  for key in path:
    tree = tree.setdefault(key, {})
  return tree


def _get(tree: Mapping, path: Sequence[str]) -> Mapping:
  for key in path:
    tree = tree[key]
  return tree


__all__ = ["COLLECTION", "calibrate", "observe", "quant_stat", "to_quant_stats"]
