"""The registry of configs every shared check runs over (torch-free), and the shared helpers.

To add an observer, append ``pytest.param(config, example_shape, id=...)`` to CASES. The example is
sharded along axis 0 for the sync checks, so per-channel cases should not use ch_axis 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import jax_observers as jo

CASES = [
  pytest.param(jo.MinMaxObserver(), (8, 5), id="minmax"),
  pytest.param(
    jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric), (16,), id="minmax-sym"
  ),
  pytest.param(jo.MovingAverageMinMaxObserver(averaging_constant=0.3), (8, 3), id="ema"),
  pytest.param(jo.PerChannelMinMaxObserver(ch_axis=1), (8, 4, 2), id="per-channel"),
  pytest.param(
    jo.PerChannelMinMaxObserver(ch_axis=-1, qscheme=jo.per_channel_affine_float_qparams),
    (8, 3),
    id="per-channel-float-qparams",
  ),
  pytest.param(
    jo.MovingAveragePerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8), (8, 6), id="ema-pc"
  ),
  pytest.param(jo.FixedQParamsObserver(scale=2.0 / 256, zero_point=128), (8, 2), id="fixed"),
  pytest.param(jo.PlaceholderObserver(), (8,), id="placeholder"),
  pytest.param(jo.NoopObserver(), (8,), id="noop"),
  pytest.param(jo.ReuseInputObserver(), (8,), id="reuse-input"),
  pytest.param(jo.RecordingObserver(capacity=3), (8, 2), id="recording"),
  pytest.param(jo.HistogramObserver(bins=64), (8, 5), id="histogram"),
  pytest.param(
    jo.HistogramPercentileObserver(bins=64, ch_axis=1, qscheme=jo.per_channel_affine),
    (8, 3),
    id="hist-percentile-pc",
  ),
  pytest.param(jo.HistogramMSEObserver(bins=64, steps=10), (8, 3), id="hist-mse"),
  pytest.param(
    jo.HistogramEntropyObserver(bins=64, start_bin=16, num_quantized_bins=16), (8, 3), id="hist-kl"
  ),
  # Granularities, fp8, MX, pow2 (issue 5). Activation cases use token_axes=1: the example is
  # sharded along axis 0, and token axes keep the state shape independent of the token count.
  pytest.param(
    jo.AffineQuantizedMinMaxObserver(
      mapping_type=jo.MappingType.ASYMMETRIC,
      target_dtype=jnp.uint4,
      granularity=jo.PerGroup(4),
      token_axes=1,
    ),
    (8, 3, 8),
    id="affine-uint4-group",
  ),
  pytest.param(
    jo.AffineQuantizedMinMaxObserver(
      mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerToken()
    ),
    (8, 6),
    id="affine-per-token",
  ),
  pytest.param(
    jo.AffineQuantizedMinMaxObserver(
      mapping_type=jo.MappingType.SYMMETRIC_NO_CLIPPING_ERR,
      target_dtype=jnp.int4,
      granularity=jo.PerAxis(-1),
      token_axes=1,
    ),
    (8, 6),
    id="affine-no-clip-axis",
  ),
  pytest.param(
    jo.AffineQuantizedMovingAverageMinMaxObserver(
      mapping_type=jo.MappingType.ASYMMETRIC,
      target_dtype=jnp.uint8,
      granularity=jo.PerBlock((2, 4)),
      preserve_zero=False,
      zero_point_domain=jo.ZeroPointDomain.FLOAT,
      token_axes=1,
      pad_partial_blocks=True,
      averaging_constant=0.5,
    ),
    (8, 5, 6),
    id="affine-ema-block-pad",
  ),
  pytest.param(jo.Float8Observer(granularity=jo.PerRow(), token_axes=1), (8, 4, 6), id="fp8-row"),
  pytest.param(jo.Float8DelayedScalingObserver(history_len=4), (8, 5), id="fp8-delayed"),
  pytest.param(jo.MXObserver(token_axes=1), (8, 64), id="mx-fp8"),
  pytest.param(
    jo.Pow2ScaleObserver(
      observer=jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric), mode="round"
    ),
    (8, 5),
    id="pow2-round",
  ),
  pytest.param(
    jo.FakeQuantize(
      observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=1, dtype=jnp.int8),
      quant_min=-128,
      quant_max=127,
    ),
    (8, 4),
    id="fake-quant-pc",
  ),
  pytest.param(jo.default_fused_act_fake_quant(use_kernel_params=True), (8, 3), id="fused-kernel"),
  pytest.param(jo.LearnableFakeQuantize(quant_min=0, quant_max=255), (8, 3), id="learnable"),
]


def batches(shape, n=3, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return [
    (rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-1, 1)).astype(dtype)
    for _ in range(n)
  ]


def observe(obs, xs, update=None):
  update = update or obs.update
  state = obs.init(xs[0])
  for x in xs:
    state = update(state, x)
  return state


def qparams_or_none(obs, state):
  try:
    return obs.calculate_qparams(state)
  except jo.QParamsUnavailableError:
    return None


def mesh8(axis: str = "data") -> Mesh:
  """The 8 host devices the conftest asks XLA for, as a 1-D mesh."""
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets --xla_force_host_platform_device_count=8"
  return Mesh(np.array(devices), (axis,))


def sharded(fn, *, out_specs=None, axis: str = "data"):
  """``fn(state, x)`` jitted under ``shard_map`` over :func:`mesh8`: the state (and anything else
  in front of ``x``) replicated, ``x`` split along its first axis."""
  return jax.jit(
    jax.shard_map(
      fn,
      mesh=mesh8(axis),
      in_specs=(PartitionSpec(), PartitionSpec(axis)),
      out_specs=PartitionSpec() if out_specs is None else out_specs,
      check_vma=False,
    )
  )
