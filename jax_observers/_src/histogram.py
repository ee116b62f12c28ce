r"""``HistogramObserver``: torch's running histogram and L2 range search, bit for bit.

``update`` keeps a ``bins``-bin histogram of everything observed on the running range
:math:`[m, M]`; when the range grows the old counts are re-binned (torch's zero-order hold with
``upsample_rate`` sub-bins). ``calculate_qparams`` searches the clipping range :math:`[m', M']`
that torch's greedy walk finds,

.. math::
   (m', M') = \big(m + w\,s^\ast,\ m + w\,(e^\ast + 1)\big), \qquad w = \frac{M - m}{\mathrm{bins}},

where :math:`[s^\ast, e^\ast]` is the last bin range before the modelled L2 error
(:mod:`histogram_search`) first increases, and maps it to ``scale``/``zero_point`` like
:class:`MinMaxObserver`. The search runs on the host (NumPy, float64 where torch uses Python
floats) through ``jax.pure_callback``, so it works under ``jit`` and ``vmap`` with x64 off.

Non-finite values: NaN and :math:`\pm\infty` are dropped (torch drops :math:`\pm\infty` with a warning
and raises on NaN); a batch with no finite value leaves the state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import hist_accumulate, hist_pow2, histogram_search, qparams
from jax_observers._src import state_dict as state_dict_lib
from jax_observers._src.base import (
  QParams,
  UniformObserver,
  check_float_input,
  per_tensor_affine,
  per_tensor_symmetric,
)
from jax_observers._src.hist_accumulate import HistogramState

_BITS = {"int8": 8, "uint8": 8, "uint4": 8, "int16": 16, "uint16": 16, "int32": 32}


def check_histogram_config(obs) -> None:
  """Shared checks of ``bins``, ``upsample_rate``, ``range_policy`` (ValueErrors naming them)."""
  if isinstance(obs.bins, bool) or not isinstance(obs.bins, int) or obs.bins < 1:
    raise ValueError(f"bins={obs.bins!r} must be a positive int.")
  if obs.range_policy not in hist_accumulate.RANGE_POLICIES:
    raise ValueError(
      f"range_policy={obs.range_policy!r}; expected one of {hist_accumulate.RANGE_POLICIES}."
    )
  if obs.range_policy == "pow2":
    hist_pow2.check_bins(obs.bins)
  rate = obs.upsample_rate
  if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
    raise ValueError(f"upsample_rate={rate!r} must be a positive int.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramObserver(UniformObserver):
  r"""torch's ``HistogramObserver``: running histogram, then the greedy L2 range search.

  Args:
    bins: number of histogram bins (torch's default 2048).
    upsample_rate: sub-bins per bin when the range grows (torch 2.13: 16).
    range_policy: ``'torch'`` (torch's re-binning, bit-exact with torch) or ``'pow2'`` (exact
      power-of-two grid, independent of how the data was batched; the searched range is then
      clipped to the observed ``[min_val, max_val]``; ``bins`` must be a power of two).
    dtype, qscheme, reduce_range, quant_min, quant_max, eps: as :class:`MinMaxObserver`. The search
      quantizes into ``2**bits(dtype)`` bins whatever ``quant_min``/``quant_max`` say, as torch.
    ignore_nonfinite: must stay True: NaN and ``±inf`` are never histogrammed.

  Raises:
    NotImplementedError: a per-channel ``qscheme`` or ``is_dynamic=True`` (as torch).
    ValueError: a float8 ``dtype`` (torch raises TypeError), bad ``bins``/``upsample_rate``.

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.HistogramObserver(bins=64)
    >>> x = jnp.linspace(-1.0, 3.0, 1000)
    >>> state = jax.jit(obs.update)(obs.init(x), x)
    >>> float(state.histogram.sum()), float(state.min_val), float(state.max_val)
    (1000.0, -1.0, 3.0)
    >>> scale, zero_point = jax.jit(obs.calculate_qparams)(state)
    >>> print(f"{float(scale):.6f}", int(zero_point))
    0.015441 65
  """

  bins: int = 2048
  upsample_rate: int = 16
  range_policy: str = "torch"
  ignore_nonfinite: bool = True

  allowed_qschemes: ClassVar = (per_tensor_affine, per_tensor_symmetric)

  def __post_init__(self):
    super().__post_init__()
    if self.is_dynamic:
      raise NotImplementedError("HistogramObserver does not support is_dynamic=True (as torch).")
    if self.dtype.name not in _BITS:
      raise ValueError(
        f"HistogramObserver got dtype={self.dtype.name!r}, which has no integer bit width "
        "(torch raises TypeError from torch.iinfo); use an integer dtype."
      )
    if not self.ignore_nonfinite:
      raise ValueError("ignore_nonfinite=False: a histogram cannot hold NaN or inf; leave it True.")
    check_histogram_config(self)

  @property
  def dst_nbins(self) -> int:
    """``2 ** bits(dtype)``: the search's destination bins (quant_min/max are ignored, as torch)."""
    return 2 ** _BITS[self.dtype.name]

  def init(self, x) -> HistogramState:
    check_float_input(x, self)
    return hist_accumulate.fresh_state((), self.bins, self.range_policy)

  def update(self, state: HistogramState, x, *, axis_name=None) -> HistogramState:
    """Observes ``x``; with ``axis_name``, the global batch across that mapped axis."""
    x = check_float_input(x, self)
    if jnp.shape(state.histogram) != (self.bins,):
      raise ValueError(
        f"HistogramObserver(bins={self.bins}) got a histogram of shape "
        f"{jnp.shape(state.histogram)}; build the state with init(x)."
      )
    if x.size == 0:
      return state
    return hist_accumulate.accumulate(
      state,
      x,
      ch_axis=None,
      range_policy=self.range_policy,
      mode="signed",
      upsample_rate=self.upsample_rate,
      axis_name=axis_name,
    )

  def search_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The clipping range ``(new_min, new_max)`` of torch's ``_non_linear_param_search``."""
    if self.range_policy == "torch":
      lo, hi = state.min_val, state.max_val
    else:
      lo, hi = hist_accumulate.grid_edges(state, range_policy="pow2", mode="signed")
    hist = jnp.asarray(state.histogram).astype(jnp.float32)
    new_min, new_max = histogram_search.search(hist, lo, hi, self.dst_nbins)
    if self.range_policy == "pow2":
      new_min = jnp.maximum(new_min, state.min_val)
      new_max = jnp.minimum(new_max, state.max_val)
    return new_min, new_max

  def calculate_qparams(self, state: HistogramState) -> QParams:
    """torch's ``calculate_qparams``: ``(1.0, 0)`` before any data, else the searched range's."""
    new_min, new_max = self.search_range(state)
    return qparams.calculate_qparams(new_min, new_max, self)


default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)


def _to_dict(observer, state) -> dict[str, np.ndarray]:
  return {
    "eps": np.array([observer.eps], np.float32),
    "histogram": np.array(state.histogram, np.float32),
    "min_val": np.array(state.min_val, np.float32).reshape(()),
    "max_val": np.array(state.max_val, np.float32).reshape(()),
  }


def _from_dict(observer, d, *, strict, example):
  keys = ("eps", "histogram", "min_val", "max_val")
  eps, _, _, _ = state_dict_lib.take(d, keys, observer, strict)
  state_dict_lib.check_eps(eps, observer, strict)
  hist = np.asarray(d["histogram"], np.float32)
  if hist.shape != (observer.bins,):
    raise ValueError(f"histogram has shape {hist.shape}; the observer has bins={observer.bins}.")
  if observer.range_policy == "pow2":
    hist = hist.astype(np.int32)
  bounds = []
  for name, empty in (("min_val", np.inf), ("max_val", -np.inf)):
    value = np.asarray(d[name], np.float32)
    if value.shape == (0,):  # torch's pre-v3 never-observed buffers
      value = np.float32(empty)
    if value.size != 1:
      raise ValueError(f"HistogramObserver expects a scalar {name}, got shape {value.shape}.")
    bounds.append(value.reshape(()))
  return HistogramState(histogram=hist, min_val=bounds[0], max_val=bounds[1])


state_dict_lib.register(HistogramObserver, _to_dict, _from_dict)
