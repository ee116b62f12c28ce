"""jax_observers: quantization observers for JAX and Flax, bit-exact with torch.ao.quantization."""

from jax_observers import linen, nnx, plot
from jax_observers._src import export as _export
from jax_observers._src.affine.granularity import (
  BlockLayout,
  Granularity,
  PerAxis,
  PerBlock,
  PerGroup,
  PerRow,
  PerTensor,
  PerToken,
  block_layout,
  get_block_size,
)
from jax_observers._src.affine.observers import (
  AffineQuantizedMinMaxObserver,
  AffineQuantizedMovingAverageMinMaxObserver,
)
from jax_observers._src.affine.qparams import (
  MappingType,
  ZeroPointDomain,
  choose_qparams_affine,
  choose_qparams_affine_with_min_max,
)
from jax_observers._src.affine.quantize import dequantize_affine, quantize_affine
from jax_observers._src.base import (
  FLOAT32_EPS,
  Observer,
  QParams,
  QParamsUnavailableError,
  QScheme,
  Quantizer,
  UniformGrid,
  UniformObserver,
  calculate_qmin_qmax,
  per_channel_affine,
  per_channel_affine_float_qparams,
  per_channel_symmetric,
  per_tensor_affine,
  per_tensor_symmetric,
)
from jax_observers._src.config import PartialConfig
from jax_observers._src.fake_quant.codes import dequantize, quantize
from jax_observers._src.fake_quant.fake_quantize import (
  FakeQuantize,
  FakeQuantizeBase,
  FixedQParamsFakeQuantize,
)
from jax_observers._src.fake_quant.fused import FusedMovingAvgObsFakeQuantize
from jax_observers._src.fake_quant.learnable import LearnableFakeQuantize
from jax_observers._src.fake_quant.learnable_ops import (
  fake_quantize_learnable_per_channel_affine,
  fake_quantize_learnable_per_tensor_affine,
)
from jax_observers._src.fake_quant.ops import (
  fake_quantize_per_channel_affine,
  fake_quantize_per_tensor_affine,
)
from jax_observers._src.fake_quant.presets import (
  default_affine_fixed_qparams_fake_quant,
  default_dynamic_fake_quant,
  default_embedding_fake_quant,
  default_embedding_fake_quant_4bit,
  default_fake_quant,
  default_fixed_qparams_range_0to1_fake_quant,
  default_fixed_qparams_range_neg1to1_fake_quant,
  default_fused_act_fake_quant,
  default_fused_per_channel_wt_fake_quant,
  default_fused_wt_fake_quant,
  default_histogram_fake_quant,
  default_per_channel_weight_fake_quant,
  default_symmetric_fixed_qparams_fake_quant,
  default_weight_fake_quant,
  fused_per_channel_wt_fake_quant_range_neg_127_to_127,
  fused_wt_fake_quant_range_neg_127_to_127,
)
from jax_observers._src.fake_quant.state import (
  FakeQuantizeState,
  LearnableFakeQuantizeState,
  disable_fake_quant,
  disable_observer,
  enable_fake_quant,
  enable_observer,
  enable_param_learning,
  enable_static_estimate,
  enable_static_observation,
)
from jax_observers._src.formats.fp8 import AmaxState, Float8Observer, float8_scale_from_amax
from jax_observers._src.formats.fp8_delayed import DelayedScalingState, Float8DelayedScalingObserver
from jax_observers._src.formats.mx import (
  MXObserver,
  ScaleCalculationMode,
  e8m0_to_float32,
  mx_exponent_from_amax,
  to_mx,
)
from jax_observers._src.formats.pow2_scale import Pow2ScaleObserver, pow2_round, pow2_scale
from jax_observers._src.histogram.accumulate import HistogramState
from jax_observers._src.histogram.calibrators import (
  HistogramEntropyObserver,
  HistogramMSEObserver,
  HistogramPercentileObserver,
)
from jax_observers._src.histogram.observer import HistogramObserver
from jax_observers._src.observers.fixed import FixedQParamsObserver, FixedQParamsState
from jax_observers._src.observers.minmax import (
  MinMaxObserver,
  MinMaxState,
  MovingAverageMinMaxObserver,
)
from jax_observers._src.observers.per_channel import (
  MovingAveragePerChannelMinMaxObserver,
  PerChannelMinMaxObserver,
)
from jax_observers._src.observers.placeholder import (
  EmptyState,
  NoopObserver,
  PlaceholderObserver,
  ReuseInputObserver,
)
from jax_observers._src.observers.presets import (
  default_affine_fixed_qparams_observer,
  default_debug_observer,
  default_dynamic_quant_observer,
  default_fixed_qparams_range_0to1_observer,
  default_fixed_qparams_range_neg1to1_observer,
  default_float_qparams_observer,
  default_float_qparams_observer_4bit,
  default_histogram_observer,
  default_observer,
  default_per_channel_weight_observer,
  default_placeholder_observer,
  default_reuse_input_observer,
  default_symmetric_fixed_qparams_observer,
  default_weight_observer,
  per_channel_weight_observer_range_neg_127_to_127,
  weight_observer_range_neg_127_to_127,
)
from jax_observers._src.observers.recording import RecordingObserver, RecordingState
from jax_observers._src.ptq.weights import (
  QuantizedArray,
  dequantize_params,
  int4_weight_rules,
  quantize_array,
  quantize_params,
  sqnr,
)
from jax_observers._src.serialization import load_state_dict, state_dict

__version__ = "0.1.0"

__all__ = [
  "AffineQuantizedMinMaxObserver",
  "AffineQuantizedMovingAverageMinMaxObserver",
  "AmaxState",
  "BlockLayout",
  "DelayedScalingState",
  "EmptyState",
  "FLOAT32_EPS",
  "FakeQuantize",
  "FakeQuantizeBase",
  "FakeQuantizeState",
  "Float8DelayedScalingObserver",
  "Float8Observer",
  "FixedQParamsFakeQuantize",
  "FixedQParamsObserver",
  "FixedQParamsState",
  "FusedMovingAvgObsFakeQuantize",
  "Granularity",
  "HistogramEntropyObserver",
  "HistogramMSEObserver",
  "HistogramObserver",
  "HistogramPercentileObserver",
  "HistogramState",
  "LearnableFakeQuantize",
  "LearnableFakeQuantizeState",
  "MXObserver",
  "MappingType",
  "MinMaxObserver",
  "MinMaxState",
  "MovingAverageMinMaxObserver",
  "MovingAveragePerChannelMinMaxObserver",
  "NoopObserver",
  "Observer",
  "PartialConfig",
  "PerChannelMinMaxObserver",
  "PerAxis",
  "PerBlock",
  "PerGroup",
  "PerRow",
  "PerTensor",
  "PerToken",
  "PlaceholderObserver",
  "Pow2ScaleObserver",
  "QParams",
  "QParamsUnavailableError",
  "QScheme",
  "Quantizer",
  "QuantizedArray",
  "RecordingObserver",
  "RecordingState",
  "ReuseInputObserver",
  "ScaleCalculationMode",
  "UniformGrid",
  "UniformObserver",
  "ZeroPointDomain",
  "block_layout",
  "calculate_qmin_qmax",
  "choose_qparams_affine",
  "choose_qparams_affine_with_min_max",
  "default_affine_fixed_qparams_fake_quant",
  "default_affine_fixed_qparams_observer",
  "default_debug_observer",
  "default_dynamic_fake_quant",
  "default_dynamic_quant_observer",
  "default_embedding_fake_quant",
  "default_embedding_fake_quant_4bit",
  "default_fake_quant",
  "default_fixed_qparams_range_0to1_fake_quant",
  "default_fixed_qparams_range_0to1_observer",
  "default_fixed_qparams_range_neg1to1_fake_quant",
  "default_fixed_qparams_range_neg1to1_observer",
  "default_float_qparams_observer",
  "default_float_qparams_observer_4bit",
  "default_fused_act_fake_quant",
  "default_fused_per_channel_wt_fake_quant",
  "default_fused_wt_fake_quant",
  "default_histogram_fake_quant",
  "default_histogram_observer",
  "default_observer",
  "default_per_channel_weight_fake_quant",
  "default_per_channel_weight_observer",
  "default_placeholder_observer",
  "default_reuse_input_observer",
  "default_symmetric_fixed_qparams_fake_quant",
  "default_symmetric_fixed_qparams_observer",
  "default_weight_fake_quant",
  "default_weight_observer",
  "dequantize",
  "dequantize_affine",
  "dequantize_params",
  "disable_fake_quant",
  "disable_observer",
  "e8m0_to_float32",
  "enable_fake_quant",
  "enable_observer",
  "enable_param_learning",
  "enable_static_estimate",
  "enable_static_observation",
  "fake_quantize_learnable_per_channel_affine",
  "fake_quantize_learnable_per_tensor_affine",
  "fake_quantize_per_channel_affine",
  "fake_quantize_per_tensor_affine",
  "float8_scale_from_amax",
  "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
  "fused_wt_fake_quant_range_neg_127_to_127",
  "get_block_size",
  "int4_weight_rules",
  "linen",
  "load_state_dict",
  "mx_exponent_from_amax",
  "nnx",
  "per_channel_affine",
  "per_channel_affine_float_qparams",
  "per_channel_symmetric",
  "per_channel_weight_observer_range_neg_127_to_127",
  "per_tensor_affine",
  "per_tensor_symmetric",
  "plot",
  "pow2_round",
  "pow2_scale",
  "quantize",
  "quantize_affine",
  "quantize_array",
  "quantize_params",
  "sqnr",
  "state_dict",
  "to_mx",
  "weight_observer_range_neg_127_to_127",
]


_export.register(
  AmaxState,
  DelayedScalingState,
  EmptyState,
  FakeQuantizeState,
  FixedQParamsState,
  HistogramState,
  LearnableFakeQuantizeState,
  MinMaxState,
  QParams,
  RecordingState,
)


def __getattr__(name: str):
  """``jo.qwix`` imports on first use: it needs the optional ``qwix`` package."""
  if name == "qwix":
    import importlib

    return importlib.import_module("jax_observers.qwix")
  raise AttributeError(f"module 'jax_observers' has no attribute {name!r}")
