r"""``HistogramObserver``: torch's running histogram and L2 range search, bit for bit.

``update`` keeps a ``bins``-bin histogram of everything observed on the running range
:math:`[m, M]`; when the range grows the old counts are re-binned (torch's zero-order hold with
``upsample_rate`` sub-bins). ``calculate_qparams`` searches the clipping range :math:`[m', M']`
that torch's greedy walk finds,

.. math::
   (m', M') = \big(m + w\,s^\ast,\ m + w\,(e^\ast + 1)\big), \qquad w = \frac{M - m}{\mathrm{bins}},

where :math:`[s^\ast, e^\ast]` is the last bin range before the modelled L2 error
(:mod:`search_host`) first increases, and maps it to ``scale``/``zero_point`` like
:class:`MinMaxObserver`. The search runs on the device, torch's Python-float (float64) steps
emulated exactly in float32 arithmetic (:mod:`search_device`), under ``jit``, ``vmap``
and ``jax.export`` with x64 off; ``search='host'`` runs the NumPy mirror through a host callback.

Non-finite values: NaN and :math:`\pm\infty` are dropped (torch drops :math:`\pm\infty` with a warning
and raises on NaN); a batch with no finite value leaves the state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import serialization
from jax_observers._src.base import (
  QParams,
  UniformObserver,
  per_tensor_affine,
  per_tensor_symmetric,
  python_scalars,
)
from jax_observers._src.config import float_input
from jax_observers._src.histogram import accumulate, grids, search_device, search_host
from jax_observers._src.histogram.accumulate import HistogramState
from jax_observers._src.observers import qparams

_BITS = {"int8": 8, "uint8": 8, "uint4": 8, "int16": 16, "uint16": 16, "int32": 32}


def check_histogram_config(obs) -> None:
  """Shared checks of ``bins``, ``upsample_rate``, ``range_policy`` (ValueErrors naming them).

  NumPy integers (``np.int64(64)``) are taken as the Python ints they hold.
  """
  python_scalars(obs)
  if isinstance(obs.bins, bool) or not isinstance(obs.bins, int) or obs.bins < 1:
    raise ValueError(f"bins={obs.bins!r} must be a positive int.")
  grids.policy(obs.range_policy).check_bins(obs.bins)
  rate = obs.upsample_rate
  if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
    raise ValueError(f"upsample_rate={rate!r} must be a positive int.")


SEARCHES = {"device": search_device.search, "host": search_host.search}
DEVICE_MAX_DST_NBINS = 2**24  # int32/uint32-wide dtypes (2**32 destination bins) search on the host


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramObserver(grids.OnGrid, UniformObserver):
  r"""torch's ``HistogramObserver``: running histogram, then the greedy L2 range search.

  Args:
    bins: number of histogram bins (torch's default 2048).
    upsample_rate: sub-bins per bin when the range grows (torch 2.13: 16).
    range_policy: ``'torch'`` (torch's re-binning, bit-exact with torch) or ``'pow2'`` (exact
      power-of-two grid, independent of how the data was batched; the searched range is then
      clipped to the observed ``[min_val, max_val]``; ``bins`` must be a power of two).
    search: where torch's L2 search runs: ``'device'`` (default: float32/int32 on the device, torch's
      float64 steps emulated exactly, no host callback, exportable; :mod:`search_device`)
      or ``'host'`` (NumPy through ``jax.pure_callback``). The two agree bit for bit except on
      ranges so small that XLA:CPU flushes the device's subnormal error terms (std below ~1e-10),
      where ``'host'`` keeps torch's answer. Dtypes wider than 24 bits (``int32``: 2**32
      destination bins, past float32's exact integers) always search on the host.
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
  search: str = "device"
  ignore_nonfinite: bool = True

  allowed_qschemes: ClassVar = (per_tensor_affine, per_tensor_symmetric)
  mode: ClassVar[str] = "signed"  # what the histogram holds: x itself, on [min_val, max_val]

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
    if self.search not in SEARCHES:
      raise ValueError(f"search={self.search!r}; expected one of {tuple(SEARCHES)}.")

  @property
  def dst_nbins(self) -> int:
    """``2 ** bits(dtype)``: the search's destination bins (quant_min/max are ignored, as torch)."""
    return 2 ** _BITS[self.dtype.name]

  def init(self, x) -> HistogramState:
    float_input(x, self)
    return accumulate.fresh_state((), self.bins, self.grid)

  def update(self, state: HistogramState, x, *, axis_name=None) -> HistogramState:
    """Observes ``x``; with ``axis_name``, the global batch across that mapped axis."""
    x = float_input(x, self)
    self.check_state(state, "update")
    if x.size == 0:
      return state
    return accumulate.accumulate(
      state,
      x,
      ch_axis=None,
      grid=self.grid,
      mode="signed",
      upsample_rate=self.upsample_rate,
      axis_name=axis_name,
    )

  def check_state(self, state: HistogramState, method: str) -> None:
    """At trace time: ``state`` is a ``bins``-bin histogram of this ``range_policy``."""
    accumulate.check_state(self, state, method, (), self.grid)

  def search_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The clipping range ``(new_min, new_max)`` of torch's ``_non_linear_param_search``."""
    self.check_state(state, "search_range")
    lo, hi = self.grid.search_domain(state.min_val, state.max_val, self.bins)
    hist = jnp.asarray(state.histogram).astype(jnp.float32)
    search = self.search if self.dst_nbins <= DEVICE_MAX_DST_NBINS else "host"
    new_min, new_max = SEARCHES[search](hist, lo, hi, self.dst_nbins)
    return self.grid.search_bounds(new_min, new_max, state.min_val, state.max_val)

  def calculate_qparams(self, state: HistogramState) -> QParams:
    """torch's ``calculate_qparams``: ``(1.0, 0)`` before any data, else the searched range's."""
    self.check_state(state, "calculate_qparams")
    new_min, new_max = self.search_range(state)
    return qparams.calculate_qparams(new_min, new_max, self)


def _to_dict(observer, state) -> dict[str, np.ndarray]:
  # The histogram keeps its dtype: float32 for torch's evenly spaced bins, int32 for the pow2 grid,
  # so a state dict says which grid its counts are on.
  return {
    "eps": np.array([observer.eps], np.float32),
    "histogram": np.array(state.histogram),
    "min_val": np.array(state.min_val, np.float32),
    "max_val": np.array(state.max_val, np.float32),
  }


def histogram_from_dict(observer, d, *, strict: bool, channels: bool, mode: str = "signed"):
  """A :class:`HistogramState` from ``d``, validated (the loader of every histogram observer).

  Args:
    observer: a config with ``bins``, ``range_policy`` and ``eps``.
    d: NumPy values keyed ``eps``, ``histogram``, ``min_val``, ``max_val``.
    strict: as :func:`jo.load_state_dict`.
    channels: True for ``[C, bins]`` histograms (``ch_axis`` set), False for ``[bins]``.
    mode: what the histogram holds (``'signed'``, ``'symmetric'``, ``'absolute'``).

  Refuses, naming the key and value: a histogram of the other range policy (float32 counts are
  torch's evenly spaced bins, int32 ones the power-of-two grid), negative, NaN, infinite or (pow2)
  fractional counts, counts on a never-observed range or (pow2) outside the grid of the range,
  and, under ``strict``, NaN or inverted ranges (``strict=False`` loads them as never observed).
  """
  keys = ("eps", "histogram", "min_val", "max_val")
  eps, hist, min_val, max_val = serialization.take(d, keys, observer, strict)
  serialization.check_eps(eps, observer, strict)
  bins, grid = observer.bins, observer.grid
  integer_counts = jnp.issubdtype(grid.count_dtype, jnp.integer)
  if hist.ndim != (2 if channels else 1) or hist.shape[-1] != bins:
    want = "[C, bins]" if channels else "[bins]"
    serialization.refuse(observer, "histogram", hist, f"expected shape {want} with bins={bins}")
  integer = np.issubdtype(hist.dtype, np.integer)
  if integer != integer_counts:
    got = "range_policy='pow2' grid" if integer else "range_policy='torch' (torch's) bins"
    serialization.refuse(
      observer,
      "histogram",
      hist,
      f"its {hist.dtype.name} counts are on a {got}, but this observer has "
      f"range_policy={grid.name!r}, whose counts are {grid.count_dtype.name}; the bins "
      "cannot be converted exactly",
    )
  kind = "count" if integer_counts else "float"
  hist = serialization.checked(
    observer, "histogram", hist, kind=kind, finite=True, nonnegative=True
  )
  shape = hist.shape[:-1]
  shapes = [shape] if channels else [(), (1,), (0,)]
  if not channels:  # torch's pre-v3 never-observed buffers are empty
    min_val = np.full((), np.inf, np.float32) if min_val.shape == (0,) else min_val
    max_val = np.full((), -np.inf, np.float32) if max_val.shape == (0,) else max_val
  never = np.asarray((min_val == np.inf) & (max_val == -np.inf)).reshape(shape)
  if np.any(never & np.any(hist != 0, axis=-1)):
    serialization.refuse(observer, "histogram", hist, "counts on a range that observed nothing")
  lo, hi = serialization.running_range(observer, min_val, max_val, strict=strict, shapes=shapes)
  lo, hi = lo.reshape(shape), hi.reshape(shape)
  hist = np.where((lo <= hi)[..., None], hist, np.zeros((), hist.dtype))  # strict=False: reset
  grid.check_loaded(
    lambda why: serialization.refuse(observer, "histogram", hist, why), hist, lo, hi, mode
  )
  return HistogramState(histogram=hist, min_val=lo, max_val=hi)


def _from_dict(observer, d, *, strict, example):
  return histogram_from_dict(observer, d, strict=strict, channels=False)


serialization.register(HistogramObserver, _to_dict, _from_dict)
