"""jax_observers: quantization observers for JAX and Flax, bit-exact with torch.ao.quantization."""

from jax_observers import linen, nnx
from jax_observers._src.base import (
  FLOAT32_EPS,
  Observer,
  QParams,
  QParamsUnavailableError,
  QScheme,
  UniformObserver,
  calculate_qmin_qmax,
  per_channel_affine,
  per_channel_affine_float_qparams,
  per_channel_symmetric,
  per_tensor_affine,
  per_tensor_symmetric,
)
from jax_observers._src.calibrators import (
  HistogramEntropyObserver,
  HistogramMSEObserver,
  HistogramPercentileObserver,
)
from jax_observers._src.fixed import FixedQParamsObserver, FixedQParamsState
from jax_observers._src.hist_accumulate import HistogramState
from jax_observers._src.histogram import HistogramObserver, default_histogram_observer
from jax_observers._src.minmax import MinMaxObserver, MinMaxState, MovingAverageMinMaxObserver
from jax_observers._src.partial import PartialConfig
from jax_observers._src.per_channel import (
  MovingAveragePerChannelMinMaxObserver,
  PerChannelMinMaxObserver,
)
from jax_observers._src.placeholder import (
  EmptyState,
  NoopObserver,
  PlaceholderObserver,
  ReuseInputObserver,
)
from jax_observers._src.presets import (
  default_affine_fixed_qparams_observer,
  default_debug_observer,
  default_dynamic_quant_observer,
  default_fixed_qparams_range_0to1_observer,
  default_fixed_qparams_range_neg1to1_observer,
  default_float_qparams_observer,
  default_float_qparams_observer_4bit,
  default_observer,
  default_per_channel_weight_observer,
  default_placeholder_observer,
  default_reuse_input_observer,
  default_symmetric_fixed_qparams_observer,
  default_weight_observer,
  per_channel_weight_observer_range_neg_127_to_127,
  weight_observer_range_neg_127_to_127,
)
from jax_observers._src.recording import RecordingObserver, RecordingState
from jax_observers._src.state_dict import load_state_dict, state_dict

__version__ = "0.1.0"

__all__ = [
  "EmptyState",
  "FLOAT32_EPS",
  "FixedQParamsObserver",
  "FixedQParamsState",
  "HistogramEntropyObserver",
  "HistogramMSEObserver",
  "HistogramObserver",
  "HistogramPercentileObserver",
  "HistogramState",
  "MinMaxObserver",
  "MinMaxState",
  "MovingAverageMinMaxObserver",
  "MovingAveragePerChannelMinMaxObserver",
  "NoopObserver",
  "Observer",
  "PartialConfig",
  "PerChannelMinMaxObserver",
  "PlaceholderObserver",
  "QParams",
  "QParamsUnavailableError",
  "QScheme",
  "RecordingObserver",
  "RecordingState",
  "ReuseInputObserver",
  "UniformObserver",
  "calculate_qmin_qmax",
  "default_affine_fixed_qparams_observer",
  "default_debug_observer",
  "default_dynamic_quant_observer",
  "default_fixed_qparams_range_0to1_observer",
  "default_fixed_qparams_range_neg1to1_observer",
  "default_histogram_observer",
  "default_float_qparams_observer",
  "default_float_qparams_observer_4bit",
  "default_observer",
  "default_per_channel_weight_observer",
  "default_placeholder_observer",
  "default_reuse_input_observer",
  "default_symmetric_fixed_qparams_observer",
  "default_weight_observer",
  "linen",
  "load_state_dict",
  "nnx",
  "per_channel_affine",
  "per_channel_affine_float_qparams",
  "per_channel_symmetric",
  "per_channel_weight_observer_range_neg_127_to_127",
  "per_tensor_affine",
  "per_tensor_symmetric",
  "state_dict",
  "weight_observer_range_neg_127_to_127",
]
