r"""Histogram calibrators: percentile, MSE and entropy (KL) clipping, per tensor or per channel.

Each observer keeps a :class:`HistogramState` (``[bins]``, or ``[C, bins]`` for ``ch_axis`` set,
updated in one pass over the data, a group of channels at a time: :mod:`accumulate`) and
turns it into a clipping range :math:`[l, h]` with a named published method
(:mod:`calibrator_search`); ``calculate_qparams`` then applies torch's formula
(:math:`s = (h^+ - l^-)/(q_{max} - q_{min})`, or the symmetric one).
The default ``range_policy='pow2'`` makes the state independent of the batch split; ``'torch'``
re-bins like torch's ``HistogramObserver``. NaN and :math:`\pm\infty` are never counted.

**Whose semantics.** The searches are the published ones, bit for bit on the same histogram
(tested live against ONNX Runtime 1.32's ``HistogramCollector`` fed jo's histogram); the grids
are torch's / ModelOpt's, not ONNX Runtime's. With ``range_policy='torch'`` the grid is
``[min, max]`` for ``x`` (torch's ``HistogramObserver``), ``[0, max|x|]`` for ``|x|`` (ModelOpt's
``HistogramCalibrator.collect``, ``torch.histc``) and ``[-max|x|, max|x|]`` for the symmetric one
(ORT's ``collect_value``); ``'pow2'`` puts the same ranges on a power-of-two grid. ORT's
``collect_absolute_value`` grid (symmetric percentile) starts at ``min|x|`` instead of 0, and ORT
silently drops later values below the first batch's ``min|x|`` (an ORT bug jo does not copy).
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
  QScheme,
  UniformObserver,
)
from jax_observers._src.config import float_input, normalized_axis
from jax_observers._src.histogram import accumulate, grids
from jax_observers._src.histogram import calibrator_search as search
from jax_observers._src.histogram import observer as histogram
from jax_observers._src.histogram.accumulate import HistogramState
from jax_observers._src.histogram.observer import check_histogram_config
from jax_observers._src.observers import qparams


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HistogramCalibrator(grids.OnGrid, UniformObserver):
  """Shared config: the histogram (``bins``, ``range_policy``, ``ch_axis``) and validation."""

  bins: int = 2048
  range_policy: str = "pow2"
  upsample_rate: int = 16
  ch_axis: int | None = None
  ignore_nonfinite: bool = True

  allowed_qschemes: ClassVar = (
    QScheme.PER_TENSOR_AFFINE,
    QScheme.PER_TENSOR_SYMMETRIC,
    QScheme.PER_CHANNEL_AFFINE,
    QScheme.PER_CHANNEL_SYMMETRIC,
  )

  def __post_init__(self):
    super().__post_init__()
    check_histogram_config(self)
    name = type(self).__name__
    if self.is_dynamic:
      raise NotImplementedError(f"{name} does not support is_dynamic=True.")
    if not self.ignore_nonfinite:
      raise ValueError("ignore_nonfinite=False: a histogram cannot hold NaN or inf; leave it True.")
    if self.ch_axis is not None and (
      isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int)
    ):
      raise ValueError(f"ch_axis={self.ch_axis!r} must be an int or None.")
    if self.qscheme.is_per_channel != (self.ch_axis is not None):
      raise ValueError(
        f"{name} got qscheme={self.qscheme.value!r} with ch_axis={self.ch_axis!r}: per-channel "
        "qschemes need ch_axis, per-tensor ones need ch_axis=None."
      )

  @property
  def mode(self) -> str:
    """What the histogram holds: ``'signed'`` x, ``'symmetric'`` x on ``[-a, a]``, ``'absolute'`` |x|."""
    return "signed"

  def _axis(self, x) -> int | None:
    if self.ch_axis is None:
      return None
    return normalized_axis(self.ch_axis, jnp.shape(x))

  def init(self, x) -> HistogramState:
    float_input(x, self)
    axis = self._axis(x)
    shape = () if axis is None else (jnp.shape(x)[axis],)
    return accumulate.fresh_state(shape, self.bins, self.grid)

  def update(self, state: HistogramState, x, *, axis_name=None) -> HistogramState:
    """Observes ``x``; with ``axis_name``, the global batch across that mapped axis."""
    x = float_input(x, self)
    axis = self._axis(x)
    channels = () if axis is None else (jnp.shape(x)[axis],)
    accumulate.check_state(self, state, "update", channels, self.grid)
    if x.size == 0:
      return state
    return accumulate.accumulate(
      state,
      x,
      ch_axis=axis,
      grid=self.grid,
      mode=self.mode,
      upsample_rate=self.upsample_rate,
      axis_name=axis_name,
    )

  def search(self, hist, edges, min_val, max_val):
    raise NotImplementedError

  def clip_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The clipping range ``(lo, hi)`` per channel; ``(inf, -inf)`` where nothing was seen."""
    fn = search.vmap_channels(self.search, state.histogram.ndim)
    lo, hi = fn(state.histogram, self.edges(state), state.min_val, state.max_val)
    seen = state.min_val <= state.max_val
    return jnp.where(seen, lo, jnp.inf), jnp.where(seen, hi, -jnp.inf)

  def calculate_qparams(self, state: HistogramState) -> QParams:
    channels = (None,) if self.ch_axis is not None else ()
    accumulate.check_state(self, state, "calculate_qparams", channels, self.grid)
    lo, hi = self.clip_range(state)
    return qparams.calculate_qparams(lo, hi, self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramPercentileObserver(_HistogramCalibrator):
  r"""Percentile clipping read from the histogram CDF (ModelOpt's / ONNX Runtime's rule, exact).

  The rule is ModelOpt's ``HistogramCalibrator`` ``_compute_amax_percentile`` and ORT's
  ``HistogramCollector.compute_percentile``: the lower edge :math:`e_{j^\ast}` of the first bin
  whose cumulative count reaches the fraction, :math:`j^\ast = \min\{j : C_j \ge qN\}`. Symmetric
  qschemes histogram :math:`|x|` and clip at :math:`\pm e_{j^\ast}` with :math:`q = p/100`
  (ModelOpt's ``amax``, ORT ``symmetric=True``); affine ones histogram :math:`x` and cut
  :math:`(100 - p)/200` on each side (ORT ``symmetric=False``). The range is clamped to the
  observed ``[min_val, max_val]`` (ORT).

  **Ties are broken exactly**: :math:`p` is read as the decimal it was written as, and
  :math:`C_j \ge qN` is decided in integer arithmetic (float-float for fractional re-binned counts),
  so when :math:`qN` is an integer reached by some :math:`C_j` the clip is that bin, the order
  statistic of rank :math:`qN`. ORT and ModelOpt compare a float64 running sum
  ``cumsum(h / N)`` with ``q``, which at such a tie can fall an ulp short and move to the next
  non-empty bin; elsewhere all three agree.

  **The grid is ModelOpt's / torch's, not ORT's**: ``|x|`` is histogrammed from 0 (ModelOpt); ORT's
  symmetric grid starts at ``min|x|``, and ORT drops later values below batch 1's ``min|x|``. The
  affine grid is torch's ``[min, max]`` where ORT's is ``[-max|x|, max|x|]``.

  Args:
    percentile: in (0, 100]; ModelOpt's default 99.99 (ORT's is 99.999).
    bins, range_policy, upsample_rate, ch_axis: the histogram (see module doc).
    dtype, qscheme, reduce_range, quant_min, quant_max, eps: as :class:`MinMaxObserver`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.HistogramPercentileObserver(percentile=99.0, bins=256, qscheme=jo.per_tensor_symmetric)
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 990), jnp.full(10, 60.0)])
    >>> lo, hi = obs.clip_range(obs.update(obs.init(x), x))
    >>> float(lo), float(hi)
    (-1.0, 1.0)
  """

  percentile: float = 99.99

  def __post_init__(self):
    super().__post_init__()
    p = self.percentile
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
      raise ValueError(f"percentile={p!r} must be a number in (0, 100].")

  @property
  def mode(self) -> str:
    return "absolute" if self.qscheme.is_symmetric else "signed"

  def search(self, hist, edges, min_val, max_val):
    return search.percentile_range(
      hist, edges, min_val, max_val, percentile=self.percentile, symmetric=self.qscheme.is_symmetric
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramMSEObserver(_HistogramCalibrator):
  r"""The clip :math:`t\,[m^-, M^+]`, :math:`t = k/\mathrm{steps}`, of least modelled squared error.

  jo's own method on torchao's candidates: torchao's ``AffineQuantizedMSEObserver.line_search``
  evaluates the same ``t = k/steps`` grid on the data of the last batch (and overwrites its range
  at every ``forward``); here the error is read from the histogram of every batch. The error of torch's quantizer for each candidate (its own scale and zero point, clipping
  included) is integrated over every bin in closed form, assuming the bin's values uniform in it
  (torch's L2 model) instead of ModelOpt's bin centres. Symmetric qschemes use
  :math:`\pm t \max(-m, M)` (torchao's ``AffineQuantizedMSEObserver`` candidates, ``steps=100``).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.HistogramMSEObserver(bins=256, steps=20, dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 10000), jnp.array([8.0])])
    >>> lo, hi = obs.clip_range(obs.update(obs.init(x), x))
    >>> float(hi)  # clipping the lone 8.0 would cost more than the coarser steps
    7.599999904632568
  """

  steps: int = 100

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"steps={self.steps!r} must be a positive int.")

  def search(self, hist, edges, min_val, max_val):
    return search.mse_range(hist, edges, min_val, max_val, observer=self, steps=self.steps)


_ENTROPY_VARIANTS = ("tensorrt", "onnxruntime", "mxnet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramEntropyObserver(_HistogramCalibrator):
  r"""KL-divergence (entropy) calibration, TensorRT or MXNet/ONNX Runtime semantics.

  The search is the named library's, on jo's histogram (the grids: module doc). ``'onnxruntime'``
  on ``range_policy='torch'`` histograms ``[-max|x|, max|x|]`` as ORT's ``collect_value`` does, so a
  single batch (or batches whose first holds the largest ``|x|``) gives ORT's grid; the divergences
  are float32 where ORT's are float64, so a near-tie can pick a neighbouring candidate.

  * ``variant='tensorrt'`` (ModelOpt ``_compute_amax_entropy``): histogram of :math:`|x|`,
    ``bins[0] = bins[1]``, candidates ``i = start_bin, start_bin + stride, ... bins``, the last
    minimum's edge is ``amax``; the clip is :math:`\pm` amax clamped to the observed range.
  * ``variant='onnxruntime'`` / ``'mxnet'`` (``get_entropy_threshold`` / ``_get_optimal_threshold``):
    histogram symmetric around 0, slices grown on both sides, smoothed distributions
    (``eps=1e-4``), first minimum. ORT truncates Q to integers and clamps to the observed range;
    MXNet spreads the last level over the leftover bins, zeroes Q where P is 0 and is symmetric.

  Args:
    num_quantized_bins: quantized levels; default 128 (TensorRT int8, ORT's default).
    start_bin, stride: the TensorRT candidates (ModelOpt's 128 and 1).
    bins: 2048 for every variant (ORT's default of 128 leaves a single candidate, ORT #9597).

  Examples:
    >>> import jax.numpy as jnp, numpy as np, jax_observers as jo
    >>> x = jnp.asarray(np.random.default_rng(0).laplace(size=20000), jnp.float32)
    >>> obs = jo.HistogramEntropyObserver(bins=512, start_bin=64, num_quantized_bins=64)
    >>> lo, hi = obs.clip_range(obs.update(obs.init(x), x))
    >>> bool(0 < hi < float(jnp.max(jnp.abs(x))))
    True
  """

  variant: str = "tensorrt"
  num_quantized_bins: int = 128
  start_bin: int = 128
  stride: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.variant not in _ENTROPY_VARIANTS:
      raise ValueError(f"variant={self.variant!r}; expected one of {_ENTROPY_VARIANTS}.")
    for name in ("num_quantized_bins", "start_bin", "stride"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    if self.variant == "tensorrt" and self.start_bin > self.bins:
      raise ValueError(f"start_bin={self.start_bin} exceeds bins={self.bins}.")
    if self.variant != "tensorrt" and not 2 <= self.num_quantized_bins <= self.bins:
      raise ValueError(
        f"num_quantized_bins={self.num_quantized_bins} must be in [2, bins={self.bins}]."
      )

  @property
  def mode(self) -> str:
    return "absolute" if self.variant == "tensorrt" else "symmetric"

  def search(self, hist, edges, min_val, max_val):
    if self.variant == "tensorrt":
      amax = search.entropy_trt_amax(
        hist,
        edges,
        num_quantized_bins=self.num_quantized_bins,
        start_bin=self.start_bin,
        stride=self.stride,
      )
      return jnp.maximum(-amax, min_val), jnp.minimum(amax, max_val)
    return search.entropy_symmetric_range(
      hist,
      edges,
      min_val,
      max_val,
      num_quantized_bins=self.num_quantized_bins,
      variant=self.variant,
    )


def _to_dict(observer, state) -> dict[str, np.ndarray]:
  return {
    "eps": np.array([observer.eps], np.float32),
    "histogram": np.array(state.histogram),
    "min_val": np.array(state.min_val, np.float32),
    "max_val": np.array(state.max_val, np.float32),
  }


def _from_dict(observer, d, *, strict, example):
  return histogram.histogram_from_dict(
    observer, d, strict=strict, channels=observer.ch_axis is not None, mode=observer.mode
  )


serialization.register(_HistogramCalibrator, _to_dict, _from_dict)
