"""FusedMovingAvgObsFakeQuantize: torch's fused kernel (use_kernel_params=True) and the observer rule."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo
from jax_observers._src.fake_quant.fused_qparams import choose_quantization_params_numpy

torch = pytest.importorskip("torch")
from torch.ao.quantization import fake_quantize as tfq  # noqa: E402


def bits(a):
  if isinstance(a, torch.Tensor):
    a = a.detach().numpy()
  a = np.array(a, np.float32)
  a[np.isnan(a)] = np.nan
  return a.view(np.uint32)


def torch_choose(lo, hi, qmin, qmax, symmetric):
  """The fused CPU kernel's qparams for each (lo, hi): one per-channel call, observer off."""
  c = len(lo)
  scale, zp = torch.ones(c), torch.zeros(c, dtype=torch.int32)
  torch.fused_moving_avg_obs_fake_quant(
    torch.zeros(c, 1),
    torch.tensor([0]),
    torch.tensor([1]),
    torch.from_numpy(lo.copy()),
    torch.from_numpy(hi.copy()),
    scale,
    zp,
    0.01,
    qmin,
    qmax,
    0,
    True,
    symmetric,
  )
  return scale.numpy(), zp.numpy()


RANGES = [(0, 255), (-128, 127), (0, 127), (-8, 7), (0, 15), (-127, 127), (-32768, 32767), (3, 200)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_choose_quantization_params_matches_torchs_kernel(symmetric):
  rng = np.random.default_rng(0)
  n = 600
  lo = -np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 3, n))
  hi = np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 3, n))
  kind = rng.integers(0, 6, n)
  lo = np.where(kind == 1, np.abs(lo) * 0.1, lo)  # all positive
  hi = np.where(kind == 2, -np.abs(hi) * 0.1, hi)  # all negative
  lo = np.where(kind == 3, -hi, lo)  # symmetric: zero-point ties
  lo, hi = np.where(kind == 4, 0.0, lo), np.where(kind == 4, 0.0, hi)  # all zero
  hi = np.where(kind == 5, lo + 1e-4 * rng.random(n), hi)  # below the 6.1e-5 scale floor
  lo, hi = np.minimum(lo, hi).astype(np.float32), np.maximum(lo, hi).astype(np.float32)
  lo[0], hi[0] = np.inf, -np.inf  # a fresh state
  for qmin, qmax in RANGES:
    ours = choose_quantization_params_numpy(lo, hi, qmin, qmax, symmetric)
    theirs = torch_choose(lo, hi, qmin, qmax, symmetric)
    np.testing.assert_array_equal(bits(ours[0]), bits(theirs[0]), err_msg=f"{qmin, qmax}")
    np.testing.assert_array_equal(ours[1], theirs[1], err_msg=f"{qmin, qmax}")
  # The device version (float32 only) against the live kernel: the default range, affine.
  qp = jax.jit(jo.FusedMovingAvgObsFakeQuantize(use_kernel_params=True).kernel_qparams)(
    jo.MinMaxState(min_val=jnp.asarray(lo), max_val=jnp.asarray(hi))
  )
  theirs = torch_choose(lo, hi, 0, 255, False)
  np.testing.assert_array_equal(bits(qp.scale), bits(theirs[0]))
  np.testing.assert_array_equal(qp.zero_point, theirs[1])


@functools.partial(jax.jit, static_argnums=0)
def jax_step(fq, state, x, dy):
  y, pullback, new_state = jax.vjp(lambda a: fq.apply(state, a), x, has_aux=True)
  return y, new_state, pullback(dy)[0]


def torch_step(module, x, dy):
  xt = torch.from_numpy(x.copy()).requires_grad_()
  y = module(xt)
  y.backward(torch.from_numpy(dy))
  return y.detach().numpy(), xt.grad.numpy()


TOGGLES = [(1, 1), (1, 1), (0, 1), (1, 1), (0, 0), (1, 1)]  # (observer, fake quant): never stale


@pytest.mark.parametrize(
  "name",
  [
    "default_fused_act_fake_quant",
    "default_fused_wt_fake_quant",
    "default_fused_per_channel_wt_fake_quant",
    "fused_wt_fake_quant_range_neg_127_to_127",
  ],
)
def test_kernel_params_match_torchs_fused_module_bit_for_bit(name):
  fq = getattr(jo, name)(use_kernel_params=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = getattr(tfq, name)()
  rng = np.random.default_rng(1)
  shape = (5, 12)
  state = fq.init(np.zeros(shape, np.float32))
  for step, (observe, quant) in enumerate(TOGGLES):
    module.enable_observer(bool(observe))
    module.enable_fake_quant(bool(quant))
    state = state.enable_observer(observe).enable_fake_quant(quant)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 4) + rng.uniform(-1, 1)).astype(np.float32)
    if step == 3:
      x[0, 0] = np.inf  # the fused kernel replaces an infinite running value with the batch value
    dy = rng.standard_normal(shape).astype(np.float32)
    y, state, dx = jax_step(fq, state, x, dy)
    ty, tdx = torch_step(module, x, dy)
    obs = module.activation_post_process
    np.testing.assert_array_equal(bits(y), bits(ty))
    np.testing.assert_array_equal(bits(dx), bits(tdx))
    np.testing.assert_array_equal(
      bits(state.activation_post_process.min_val).reshape(-1), bits(obs.min_val).reshape(-1)
    )
    np.testing.assert_array_equal(
      bits(state.activation_post_process.max_val).reshape(-1), bits(obs.max_val).reshape(-1)
    )
    np.testing.assert_array_equal(bits(state.scale).reshape(-1), bits(module.scale))
    np.testing.assert_array_equal(
      np.asarray(state.zero_point).reshape(-1), module.zero_point.numpy()
    )
  np.testing.assert_array_equal(bits(fq.calculate_qparams(state).scale), bits(state.scale))
  # torch 2.13's own calculate_qparams is the observer's formula: still reachable.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ts, _ = module.calculate_qparams()
  observer_rule = fq.activation_post_process.calculate_qparams(state.activation_post_process)
  np.testing.assert_array_equal(bits(observer_rule.scale).reshape(-1), bits(ts))
  assert sorted(jo.state_dict(fq, state)) == sorted(module.state_dict())
  back = jo.load_state_dict(fq, module.state_dict())
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, state))


def test_default_observer_rule_equals_fake_quantize_with_the_same_observer():
  observer = jo.MovingAverageMinMaxObserver.with_args(
    dtype=jnp.int8, qscheme=jo.per_tensor_symmetric
  )
  fused = jo.FusedMovingAvgObsFakeQuantize(observer=observer, quant_min=-128, quant_max=127)
  plain = jo.FakeQuantize(observer=observer, quant_min=-128, quant_max=127)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = tfq.default_weight_fake_quant()  # torch's non-fused twin (same observer and range)
  rng = np.random.default_rng(2)
  s_fused = s_plain = fused.init(np.zeros(8, np.float32))
  for _ in range(3):
    x = (rng.standard_normal(8) * 2).astype(np.float32)
    y_fused, s_fused = jax.jit(fused.apply)(s_fused, x)
    y_plain, s_plain = jax.jit(plain.apply)(s_plain, x)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ty = module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(bits(y_fused), bits(y_plain))
    np.testing.assert_array_equal(bits(y_fused), bits(ty))
  chex.assert_trees_all_equal(s_fused, s_plain)
  np.testing.assert_array_equal(bits(fused.calculate_qparams(s_fused).scale), bits(s_fused.scale))


def test_qparams_are_never_stale_after_an_observe_only_phase():  # torch E20
  fq = jo.default_fused_act_fake_quant(use_kernel_params=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = tfq.default_fused_act_fake_quant()
  x = np.array([-1.0, 2.0], np.float32)
  module.disable_fake_quant()
  module(torch.from_numpy(x))
  assert module.scale.item() == 1.0  # torch: stale
  _, state = fq.apply(fq.init(x).disable_fake_quant(), x)
  assert float(state.scale) == pytest.approx(3.0 / 255.0)  # ours: refreshed


def test_per_channel_works_on_any_axis_and_under_vmap():
  fq = jo.FusedMovingAvgObsFakeQuantize(
    observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=1, dtype=jnp.int8),
    quant_min=-128,
    quant_max=127,
    use_kernel_params=True,
  )
  rng = np.random.default_rng(3)
  xs = (rng.standard_normal((3, 4, 6)) * 2).astype(np.float32)
  state = fq.init(xs[0])
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 3), state)
  ys, states = jax.jit(jax.vmap(fq.apply))(stacked, xs)
  for i in range(3):
    y, s = fq.apply(state, xs[i])
    np.testing.assert_array_equal(bits(ys[i]), bits(y))
    chex.assert_trees_all_equal(jax.tree.map(lambda a, i=i: a[i], states), s)
  assert states.scale.shape == (3, 6)


def test_rejects_other_observers():
  with pytest.raises(TypeError, match="MovingAverageMinMaxObserver"):
    jo.FusedMovingAvgObsFakeQuantize(observer=jo.MinMaxObserver)
