"""torch's ``default_*`` fake-quant presets (``torch.ao.quantization.fake_quantize``), as partial configs.

torch passes observer arguments flat (``FakeQuantize.with_args(observer=..., dtype=...)``); here they
sit on the observer partial (``observer=MovingAverageMinMaxObserver.with_args(dtype=...)``). The
resulting configs equal torch's: e.g. ``default_weight_fake_quant`` averages with 0.01 (its torch
docstring's "memoryless" claim is false, E27) and ``default_fake_quant`` ends with the range [0, 127].
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_observers._src.base import (
  per_channel_affine_float_qparams,
  per_channel_symmetric,
  per_tensor_affine,
  per_tensor_symmetric,
)
from jax_observers._src.fake_quant.fake_quantize import FakeQuantize, FixedQParamsFakeQuantize
from jax_observers._src.fake_quant.fused import FusedMovingAvgObsFakeQuantize
from jax_observers._src.histogram.observer import HistogramObserver
from jax_observers._src.observers.minmax import MovingAverageMinMaxObserver
from jax_observers._src.observers.per_channel import MovingAveragePerChannelMinMaxObserver
from jax_observers._src.observers.presets import (
  default_fixed_qparams_range_0to1_observer,
  default_fixed_qparams_range_neg1to1_observer,
)

_MA = MovingAverageMinMaxObserver
_MA_PC = MovingAveragePerChannelMinMaxObserver

default_fake_quant = FakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.uint8, qscheme=per_tensor_affine, reduce_range=True),
  quant_min=0,
  quant_max=255,
)
default_weight_fake_quant = FakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.int8, qscheme=per_tensor_symmetric, reduce_range=False),
  quant_min=-128,
  quant_max=127,
)
default_dynamic_fake_quant = FakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.uint8, averaging_constant=1),
  quant_min=0,
  quant_max=255,
  is_dynamic=True,
)
default_fixed_qparams_range_neg1to1_fake_quant = FixedQParamsFakeQuantize.with_args(
  observer=default_fixed_qparams_range_neg1to1_observer
)
default_fixed_qparams_range_0to1_fake_quant = FixedQParamsFakeQuantize.with_args(
  observer=default_fixed_qparams_range_0to1_observer
)
default_symmetric_fixed_qparams_fake_quant = default_fixed_qparams_range_neg1to1_fake_quant
default_affine_fixed_qparams_fake_quant = default_fixed_qparams_range_0to1_fake_quant
default_per_channel_weight_fake_quant = FakeQuantize.with_args(
  observer=_MA_PC.with_args(
    dtype=jnp.int8, qscheme=per_channel_symmetric, reduce_range=False, ch_axis=0
  ),
  quant_min=-128,
  quant_max=127,
)
default_embedding_fake_quant = FakeQuantize.with_args(
  observer=_MA_PC.with_args(
    qscheme=per_channel_affine_float_qparams, dtype=jnp.uint8, ch_axis=0, averaging_constant=1
  ),
  quant_min=0,
  quant_max=255,
)
default_embedding_fake_quant_4bit = FakeQuantize.with_args(
  observer=_MA_PC.with_args(
    qscheme=per_channel_affine_float_qparams, ch_axis=0, dtype=jnp.uint4, averaging_constant=1
  ),
)
default_histogram_fake_quant = FakeQuantize.with_args(
  observer=HistogramObserver.with_args(
    dtype=jnp.uint8, qscheme=per_tensor_affine, reduce_range=True
  ),
  quant_min=0,
  quant_max=255,
)
default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.uint8), quant_min=0, quant_max=255
)
default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.int8, qscheme=per_tensor_symmetric),
  quant_min=-128,
  quant_max=127,
)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
  observer=_MA_PC.with_args(dtype=jnp.int8, qscheme=per_channel_symmetric),
  quant_min=-128,
  quant_max=127,
)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
  observer=_MA.with_args(dtype=jnp.int8, qscheme=per_tensor_symmetric, eps=2**-12),
  quant_min=-127,
  quant_max=127,
)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
  observer=_MA_PC.with_args(dtype=jnp.int8, qscheme=per_channel_symmetric, eps=2**-12),
  quant_min=-127,
  quant_max=127,
)
