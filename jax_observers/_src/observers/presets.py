"""torch's ``default_*`` observer presets, as partial configs (or classes, where torch has a class)."""

from __future__ import annotations

import jax.numpy as jnp

from jax_observers._src.base import (
  per_channel_affine_float_qparams,
  per_channel_symmetric,
  per_tensor_symmetric,
)
from jax_observers._src.histogram.observer import HistogramObserver
from jax_observers._src.observers.fixed import FixedQParamsObserver
from jax_observers._src.observers.minmax import MinMaxObserver
from jax_observers._src.observers.per_channel import PerChannelMinMaxObserver
from jax_observers._src.observers.placeholder import PlaceholderObserver, ReuseInputObserver
from jax_observers._src.observers.recording import RecordingObserver

default_observer = MinMaxObserver.with_args(quant_min=0, quant_max=127)
default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)
default_placeholder_observer = PlaceholderObserver
default_debug_observer = RecordingObserver
default_weight_observer = MinMaxObserver.with_args(dtype=jnp.int8, qscheme=per_tensor_symmetric)
weight_observer_range_neg_127_to_127 = MinMaxObserver.with_args(
  dtype=jnp.int8, qscheme=per_tensor_symmetric, quant_min=-127, quant_max=127, eps=2**-12
)
default_per_channel_weight_observer = PerChannelMinMaxObserver.with_args(
  dtype=jnp.int8, qscheme=per_channel_symmetric
)
per_channel_weight_observer_range_neg_127_to_127 = PerChannelMinMaxObserver.with_args(
  dtype=jnp.int8, qscheme=per_channel_symmetric, quant_min=-127, quant_max=127, eps=2**-12
)
default_dynamic_quant_observer = PlaceholderObserver.with_args(
  dtype=jnp.uint8, quant_min=0, quant_max=255, is_dynamic=True
)
default_float_qparams_observer = PerChannelMinMaxObserver.with_args(
  dtype=jnp.uint8, qscheme=per_channel_affine_float_qparams, ch_axis=0
)
default_float_qparams_observer_4bit = PerChannelMinMaxObserver.with_args(
  dtype=jnp.uint4, qscheme=per_channel_affine_float_qparams, ch_axis=0
)
default_fixed_qparams_range_neg1to1_observer = FixedQParamsObserver.with_args(
  scale=2.0 / 256.0, zero_point=128, dtype=jnp.uint8, quant_min=0, quant_max=255
)
default_fixed_qparams_range_0to1_observer = FixedQParamsObserver.with_args(
  scale=1.0 / 256.0, zero_point=0, dtype=jnp.uint8, quant_min=0, quant_max=255
)
default_symmetric_fixed_qparams_observer = default_fixed_qparams_range_neg1to1_observer
default_affine_fixed_qparams_observer = default_fixed_qparams_range_0to1_observer
default_reuse_input_observer = ReuseInputObserver
