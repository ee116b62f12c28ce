"""jax.export of a jitted calibrate-and-qparams step, serialized and deserialized, for every config."""

import chex
import jax
import pytest
from registry import CASES, batches, qparams_or_none

import jax_observers as jo

# Every config exports, the fused kernel's use_kernel_params=True qparams (fbgemm's float64
# ChooseQuantizationParams, emulated in float32 on the device) and HistogramObserver's L2 search
# included; only a host callback cannot (search="host", pinned below to fail loudly).
HOST_QPARAMS = set()


def _step(obs, with_qparams):
  def step(state, x):
    state = obs.update(state, x)
    return state, (qparams_or_none(obs, state) if with_qparams else None)

  return jax.jit(step)


@pytest.mark.parametrize("obs, shape", CASES)
def test_export_round_trip(obs, shape, request):
  xs = batches(shape)
  state = obs.init(xs[0])
  host = request.node.callspec.id in HOST_QPARAMS
  step = _step(obs, with_qparams=not host)
  exported = jax.export.export(step)(state, xs[0])
  restored = jax.export.deserialize(exported.serialize())
  for x in xs:
    expected = step(state, x)
    chex.assert_trees_all_equal(restored.call(state, x), expected)
    state = expected[0]
  if host:
    with pytest.raises(NotImplementedError, match="host_callbacks"):
      jax.export.export(_step(obs, with_qparams=True))(state, xs[0]).serialize()


def test_histogram_host_search_is_the_one_that_cannot_export():
  obs = jo.HistogramObserver(bins=64, search="host")
  x = batches((8, 5))[0]
  with pytest.raises(NotImplementedError, match="host_callbacks"):
    jax.export.export(_step(obs, with_qparams=True))(obs.init(x), x).serialize()


def test_fused_kernel_qparams_export_and_match_the_live_step():
  fq = jo.default_fused_per_channel_wt_fake_quant(use_kernel_params=True)
  xs = batches((6, 4))
  state = fq.init(xs[0])
  step = jax.jit(fq.apply)
  exported = jax.export.export(step)(state, xs[0])
  assert "custom_call" not in exported.mlir_module()  # no host callback left in the step
  restored = jax.export.deserialize(exported.serialize())
  for x in xs:
    expected = step(state, x)
    chex.assert_trees_all_equal(restored.call(state, x), expected)
    state = expected[1]
  assert (state.scale != 1.0).all()  # the kernel qparams were refreshed, not a stale default
