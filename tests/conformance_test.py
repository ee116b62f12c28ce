"""Every observer through the same checks: jit, recompiles, vmap, dtypes, serialization, sync, torch.

To add an observer, append a ``pytest.param(observer, example_shape, id=...)`` to CASES. The example
is sharded along axis 0 for the sync check, so per-channel cases should not use ch_axis 0.
"""

import dataclasses
import functools
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import Mesh, PartitionSpec
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME, torch

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

_FLOAT_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


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


@pytest.mark.parametrize("obs, shape", CASES)
def test_jit_equals_eager_and_compiles_once(obs, shape):
  xs = batches(shape)
  update = jax.jit(obs.update)
  jitted = observe(obs, xs, update)
  chex.assert_trees_all_equal(jitted, observe(obs, xs))
  assert update._cache_size() == 1
  chex.assert_trees_all_equal(
    qparams_or_none(obs, jitted), jax.jit(functools.partial(qparams_or_none, obs))(jitted)
  )


@pytest.mark.parametrize("obs, shape", CASES)
def test_vmap_over_a_stack_of_states_equals_a_loop(obs, shape):
  stacks = [np.stack(b) for b in zip(*(batches(shape, seed=s) for s in range(4)), strict=True)]
  states = jax.vmap(obs.init)(stacks[0])
  for x in stacks:
    states = jax.jit(jax.vmap(obs.update))(states, x)
  qparams = jax.jit(jax.vmap(functools.partial(qparams_or_none, obs), axis_size=4))(states)
  for i in range(4):
    single = observe(obs, [x[i] for x in stacks])
    chex.assert_trees_all_equal(jax.tree.map(lambda leaf, i=i: leaf[i], states), single)
    # vmapped qparams keep exact division (XLA must not turn it into a reciprocal multiply)
    chex.assert_trees_all_equal(
      jax.tree.map(lambda leaf, i=i: leaf[i], qparams), qparams_or_none(obs, single)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("obs, shape", CASES)
def test_low_precision_inputs_keep_state_dtypes(obs, shape, dtype):
  x32 = batches(shape)[0]
  state = obs.init(x32)
  if isinstance(obs, jo.RecordingObserver):
    state = obs.init(x32.astype(dtype))
  updated = jax.jit(obs.update)(state, jnp.asarray(x32, dtype))
  chex.assert_trees_all_equal_dtypes(updated, state)
  chex.assert_trees_all_equal_shapes(updated, state)


@pytest.mark.parametrize("obs, shape", CASES)
def test_fresh_state_gives_finite_qparams(obs, shape):
  qp = qparams_or_none(obs, obs.init(np.zeros(shape, np.float32)))
  if qp is not None:
    assert np.isfinite(np.asarray(qp.scale)).all()
    assert np.isfinite(np.asarray(qp.zero_point)).all()


@pytest.mark.parametrize("obs, shape", CASES)
def test_flax_serialization_round_trip(obs, shape):
  state = observe(obs, batches(shape))
  restored = serialization.from_bytes(obs.init(batches(shape)[0]), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)


@pytest.mark.parametrize("obs, shape", CASES)
def test_state_dict_round_trip(obs, shape):
  state = observe(obs, batches(shape))
  d = jo.state_dict(obs, state)
  assert all(isinstance(v, np.ndarray) for v in d.values())
  chex.assert_trees_all_equal(jo.load_state_dict(obs, d), state)


def torch_twin(obs):
  """The torch observer of the same class and config, or None where torch has none."""
  cls = getattr(torch.ao.quantization.observer, type(obs).__name__, None)
  if cls is None:
    return None
  params = inspect.signature(cls.__init__).parameters
  kwargs = {}
  for field in dataclasses.fields(obs):
    if field.name in params and field.init:
      value = getattr(obs, field.name)
      if isinstance(value, np.dtype):
        value = {**TORCH_DTYPE, **_FLOAT_TORCH}[value]
      elif isinstance(value, jo.QScheme):
        value = TORCH_QSCHEME[value]
      kwargs[field.name] = value
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cls(**kwargs)


def _has_torch_twin(case) -> bool:
  obs = case.values[0]
  return getattr(torch.ao.quantization.observer, type(obs).__name__, None) is not None


@pytest.mark.parametrize("obs, shape", [c for c in CASES if _has_torch_twin(c)])
def test_loads_torchs_own_state_dict(obs, shape):
  """Observers torch also has (the others have no torch state dict to load)."""
  twin = torch_twin(obs)
  xs = batches(shape)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for x in xs:
      twin(torch.from_numpy(x))
    torch_qparams = (
      None if qparams_or_none(obs, obs.init(xs[0])) is None else twin.calculate_qparams()
    )
  loaded = jo.load_state_dict(obs, twin.state_dict(), example=xs[0])
  expected = obs.init(xs[0]) if isinstance(obs, jo.RecordingObserver) else observe(obs, xs)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, expected))
  if torch_qparams is not None:
    scale, zero_point = obs.calculate_qparams(loaded)
    np.testing.assert_array_equal(np.reshape(scale, -1), torch_qparams[0].numpy().reshape(-1))
    np.testing.assert_array_equal(np.reshape(zero_point, -1), torch_qparams[1].numpy().reshape(-1))


@pytest.mark.parametrize("obs, shape", CASES)
def test_axis_name_sync_over_8_devices_equals_one_observer_on_the_global_batch(obs, shape):
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets --xla_force_host_platform_device_count=8"
  mesh = Mesh(np.array(devices), ("data",))
  xs = batches(shape, seed=3)
  single = observe(obs, xs)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(PartitionSpec(), PartitionSpec("data")),
    out_specs=PartitionSpec(),
    check_vma=False,
  )
  def step(state, x):
    return obs.update(state, x, axis_name="data")

  state = obs.init(xs[0])
  for x in xs:
    state = step(state, x)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, single))

  # pmap: every replica holds the same state, equal to the single observer's.
  replicated = jax.tree.map(lambda a: jnp.stack([a] * 8), obs.init(xs[0]))
  pstep = jax.pmap(functools.partial(obs.update, axis_name="data"), axis_name="data")
  for x in xs:
    replicated = pstep(replicated, x.reshape(8, -1, *x.shape[1:]))
  for i in range(8):
    chex.assert_trees_all_equal(
      jax.tree.map(lambda a, i=i: np.asarray(a[i]), replicated), jax.tree.map(np.asarray, single)
    )
