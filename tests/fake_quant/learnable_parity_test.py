"""LSQ/LSQ+ ops and LearnableFakeQuantize against torch 2.13's _LearnableFakeQuantize and its kernels."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import sharded

import jax_observers as jo

torch = pytest.importorskip("torch")
from torch.ao.quantization import observer as tobs  # noqa: E402
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize  # noqa: E402

RANGES = [(0, 255), (-128, 127), (0, 15), (-8, 7)]


def bits(a):
  if isinstance(a, torch.Tensor):
    a = a.detach().numpy()
  a = np.array(a, np.float32)
  a[np.isnan(a)] = np.nan
  return a.view(np.uint32)


def close_sums(ours, theirs, terms):
  """float32 sums in two orders: within a few ulps of the magnitude of what was summed."""
  bound = 8 * np.finfo(np.float32).eps * np.maximum(np.asarray(terms, np.float64), 1e-30)
  np.testing.assert_array_less(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs)), bound)


def inputs(rng, scale, zero_point, qmin, qmax, n):
  x = rng.standard_normal(n) * scale * (qmax - qmin) * 0.6 + (qmin + qmax) / 2 * scale * 0.1
  x[: n // 4] = (rng.integers(qmin - 3, qmax + 3, n // 4) - np.round(zero_point) + 0.5) * scale
  x[n // 4 : n // 4 + 4] = [np.nan, -np.inf, -1e30, 1e10]
  return x.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "g", "consistent"))
def per_tensor_elementwise(x, scale, zero_point, dy, *, qmin, qmax, g, consistent):
  """Per-element ``(y, dx, dscale, dzero_point)``: each element its own one-element op."""

  def one(x, dy):
    def f(x, s, z):
      return jo.fake_quantize_learnable_per_tensor_affine(
        x, s, z, qmin, qmax, g, consistent_zero_point=consistent
      )

    y, pullback = jax.vjp(f, x[None], scale, zero_point)
    return (y[0], *(v.reshape(()) for v in pullback(dy[None])))

  return jax.vmap(one)(x, dy)


def torch_per_tensor_elementwise(x, scale, zero_point, dy, qmin, qmax, g):
  out = []
  for xi, di in zip(x, dy, strict=True):
    xt = torch.tensor([xi], requires_grad=True)
    st = torch.tensor(scale.copy(), requires_grad=True)
    zt = torch.tensor(zero_point.copy(), requires_grad=True)
    y = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, qmin, qmax, g)
    y.backward(torch.tensor([di]))
    out.append([y.item(), xt.grad.item(), st.grad.item(), zt.grad.item()])
  return np.array(out, np.float32).T


def test_per_tensor_gradients_match_torch_element_by_element():
  rng = np.random.default_rng(0)
  for i, (qmin, qmax) in enumerate(RANGES):
    scale = np.array([rng.uniform(0.01, 0.3)], np.float32)
    g = [1.0, 1.0 / np.sqrt(48 * qmax)][i % 2]
    for zero_point in (rng.uniform(qmin, qmax), np.floor(rng.uniform(qmin, qmax)) + 0.5, -1.7):
      z = np.array([np.clip(zero_point, qmin, qmax)], np.float32)
      x = inputs(rng, scale[0], z[0], qmin, qmax, 48)
      dy = rng.standard_normal(48).astype(np.float32)
      ours = per_tensor_elementwise(x, scale, z, dy, qmin=qmin, qmax=qmax, g=g, consistent=False)
      theirs = torch_per_tensor_elementwise(x, scale, z, dy, qmin, qmax, g)
      for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"{qmin, qmax, z}")


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "g", "axis", "consistent"))
def value_and_grads(x, scale, zero_point, dy, *, qmin, qmax, g, axis=None, consistent=False):
  if axis is None:
    f = functools.partial(
      jo.fake_quantize_learnable_per_tensor_affine,
      quant_min=qmin,
      quant_max=qmax,
      grad_factor=g,
      consistent_zero_point=consistent,
    )
  else:
    f = functools.partial(
      jo.fake_quantize_learnable_per_channel_affine,
      axis=axis,
      quant_min=qmin,
      quant_max=qmax,
      grad_factor=g,
    )
  y, pullback = jax.vjp(f, x, scale, zero_point)
  return (y, *pullback(dy))


def torch_value_and_grads(x, scale, zero_point, dy, qmin, qmax, g, axis=None):
  xt, st, zt = (torch.tensor(a.copy(), requires_grad=True) for a in (x, scale, zero_point))
  if axis is None:
    y = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, qmin, qmax, g)
  else:
    y = torch._fake_quantize_learnable_per_channel_affine(xt, st, zt, axis, qmin, qmax, g)
  y.backward(torch.from_numpy(dy))
  return y.detach().numpy(), xt.grad.numpy(), st.grad.numpy(), zt.grad.numpy()


def test_per_tensor_and_per_channel_match_torch_on_batches():
  rng = np.random.default_rng(1)
  shape = (6, 7, 5)
  for trial in range(4):
    qmin, qmax = RANGES[trial % len(RANGES)]
    g = float(rng.choice([1.0, 1.0 / np.sqrt(210 * qmax)]))
    scale = np.array([rng.uniform(0.01, 0.3)], np.float32)
    z = np.array([rng.uniform(qmin, qmax)], np.float32)
    x = inputs(rng, scale[0], z[0], qmin, qmax, 210).reshape(shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx, ds, dz = value_and_grads(x, scale, z, dy, qmin=qmin, qmax=qmax, g=g)
    ty, tdx, tds, tdz = torch_value_and_grads(x, scale, z, dy, qmin, qmax, g)
    np.testing.assert_array_equal(bits(y), bits(ty))
    np.testing.assert_array_equal(bits(dx), bits(tdx))
    terms = np.abs(dy).sum() * (qmax - qmin + 1) * g
    close_sums(ds, tds, terms)
    close_sums(dz, tdz, np.abs(dy).sum() * scale[0] * g)
    axis = trial % 3
    c = shape[axis]
    scale = rng.uniform(0.01, 0.3, c).astype(np.float32)
    z = rng.uniform(qmin, qmax, c).astype(np.float32)
    y, dx, ds, dz = value_and_grads(x, scale, z, dy, qmin=qmin, qmax=qmax, g=g, axis=axis)
    ty, tdx, tds, tdz = torch_value_and_grads(x, scale, z, dy, qmin, qmax, g, axis)
    np.testing.assert_array_equal(bits(y), bits(ty))
    np.testing.assert_array_equal(bits(dx), bits(tdx))
    close_sums(ds, tds, terms)
    close_sums(dz, tdz, np.abs(dy).sum() * scale.max() * g)


def test_per_channel_scale_and_zero_point_gradients_are_bit_exact_per_element():
  """With one element per channel torch's sums are single terms, so every term is compared."""
  rng = np.random.default_rng(2)
  for qmin, qmax in RANGES:
    n = 200
    scale = rng.uniform(0.01, 0.3, n).astype(np.float32)
    z = rng.uniform(qmin, qmax, n).astype(np.float32)
    x = np.concatenate(
      [inputs(rng, scale[0], z[0], qmin, qmax, n // 2), rng.standard_normal(n // 2)]
    )
    x = x.astype(np.float32).reshape(n, 1)
    dy = rng.standard_normal((n, 1)).astype(np.float32)
    ours = value_and_grads(x, scale, z, dy, qmin=qmin, qmax=qmax, g=0.37, axis=0)
    theirs = torch_value_and_grads(x, scale, z, dy, qmin, qmax, 0.37, 0)
    for got, want in zip(ours, theirs, strict=True):
      np.testing.assert_array_equal(bits(got), bits(want))


def test_positive_overflow_counts_as_above_the_range_where_torch_x86_counts_it_below():
  x = np.array([np.inf, 1e30, 1e10], np.float32)
  s, z = np.array([0.05], np.float32), np.array([68.8], np.float32)
  *_, ds, _ = per_tensor_elementwise(
    x, s, z, np.ones(3, np.float32), qmin=0, qmax=255, g=1.0, consistent=False
  )
  assert ds.tolist() == [186.0, 186.0, 186.0]  # (qmax - z_b): the side the forward clamps to
  theirs = torch_per_tensor_elementwise(x, s, z, np.ones(3, np.float32), 0, 255, 1.0)
  assert theirs[2].tolist() == [-69.0, -69.0, 186.0]  # x86: int64(+inf) == INT64_MIN


def test_consistent_zero_point_uses_the_forward_rounding():  # torch E17, both ways
  x, s, z = (
    np.array([3.0, 0.0], np.float32),
    np.array([0.2], np.float32),
    np.array([2.5], np.float32),
  )
  dy = np.ones(2, np.float32)
  y, dx, ds, dz = value_and_grads(x, s, z, dy, qmin=0, qmax=15, g=1.0)
  assert (y.tolist(), dx.tolist(), ds.tolist()) == (
    [float(np.float32(13) * np.float32(0.2)), 0.0],
    [0.0, 1.0],
    [12.0],
  )
  assert dz.tolist() == [float(np.float32(-0.2))]
  y, dx, ds, dz = value_and_grads(x, s, z, dy, qmin=0, qmax=15, g=1.0, consistent=True)
  assert ds.tolist() == [13.0]  # (15 - 2): the zero point the output was computed with
  # consistent_zero_point equals torch's per-channel op, which rounds half-to-even both ways.
  rng = np.random.default_rng(3)
  for qmin, qmax in RANGES[1:3]:
    z = np.array([np.floor(rng.uniform(qmin, qmax)) + 0.5], np.float32)
    x = inputs(rng, 0.05, z[0], qmin, qmax, 64).reshape(1, 64)
    dy = rng.standard_normal((1, 64)).astype(np.float32)
    s = np.array([0.05], np.float32)
    ours = value_and_grads(x, s, z, dy, qmin=qmin, qmax=qmax, g=1.0, consistent=True)
    theirs = torch_value_and_grads(x, s, z, dy, qmin, qmax, 1.0, 0)
    np.testing.assert_array_equal(bits(ours[0]), bits(theirs[0]))
    np.testing.assert_array_equal(bits(ours[1]), bits(theirs[1]))
    close_sums(ours[2], theirs[2], np.abs(dy).sum() * (qmax - qmin + 1))
    close_sums(ours[3], theirs[3], np.abs(dy).sum() * 0.05)


def torch_module(fq: jo.LearnableFakeQuantize, observer_kwargs):
  obs_cls = getattr(tobs, type(fq.activation_post_process).__name__)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return _LearnableFakeQuantize(
      obs_cls,
      quant_min=fq.quant_min,
      quant_max=fq.quant_max,
      scale=fq.scale,
      zero_point=fq.zero_point,
      channel_len=fq.channel_len,
      use_grad_scaling=fq.use_grad_scaling,
      **observer_kwargs,
    )


@functools.partial(jax.jit, static_argnums=0)
def module_step(fq, state, x, dy):
  def f(x, scale, zero_point):
    return fq.apply(state.replace(scale=scale, zero_point=zero_point), x)

  y, pullback, new_state = jax.vjp(f, x, state.scale, state.zero_point, has_aux=True)
  return y, new_state, pullback(dy)


_MA, _MA_PC = jo.MovingAverageMinMaxObserver, jo.MovingAveragePerChannelMinMaxObserver
CONFIGS = [  # (our observer, torch's observer arguments, our and torch's arguments, channel_len)
  (_MA, {}, dict(quant_min=0, quant_max=255), -1),
  (
    _MA.with_args(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric),
    {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric},
    dict(quant_min=-128, quant_max=127, use_grad_scaling=True),
    -1,
  ),
  (
    _MA_PC.with_args(dtype=jnp.int8, qscheme=jo.per_channel_symmetric, ch_axis=1),
    {"dtype": torch.qint8, "qscheme": torch.per_channel_symmetric, "ch_axis": 1},
    dict(quant_min=-8, quant_max=7, use_grad_scaling=True),
    5,
  ),
  (
    _MA_PC.with_args(qscheme=jo.per_channel_affine, ch_axis=0),
    {"qscheme": torch.per_channel_affine, "ch_axis": 0},
    dict(quant_min=0, quant_max=15),
    4,
  ),
]


@pytest.mark.parametrize("observer, torch_kwargs, kwargs, channels", CONFIGS)
def test_module_matches_torch_through_static_estimation_then_learning(
  observer, torch_kwargs, kwargs, channels
):
  fq = jo.LearnableFakeQuantize(
    observer=observer, scale=0.1, zero_point=1.0, channel_len=channels, **kwargs
  )
  module = torch_module(fq, torch_kwargs)
  rng = np.random.default_rng(4)
  shape = (4, 5)
  state = fq.init(np.zeros(shape, np.float32))
  for step in range(6):
    if step == 0:
      module.enable_static_estimate()
      state = state.enable_static_estimate()
    if step == 2:
      module.enable_param_learning()
      state = state.enable_param_learning()
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, state, (dx, ds, dz) = module_step(fq, state, x, dy)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ty = module(xt)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(bits(y), bits(ty), err_msg=f"step {step}")
    np.testing.assert_array_equal(bits(dx), bits(xt.grad), err_msg=f"step {step}")
    np.testing.assert_array_equal(bits(state.scale).reshape(-1), bits(module.scale))
    np.testing.assert_array_equal(bits(state.zero_point).reshape(-1), bits(module.zero_point))
    if step < 2:  # static estimation: no learning, zero gradients
      assert module.scale.grad is None and not np.any(ds) and not np.any(dz)
      continue
    g = fq.grad_factor(x)
    close_sums(ds.reshape(-1), module.scale.grad, np.abs(dy).sum() * 16 * g)
    close_sums(dz.reshape(-1), module.zero_point.grad, np.abs(dy).sum() * g)
    with torch.no_grad():  # one SGD step in torch; ours continues from torch's parameters
      module.scale -= 0.01 * module.scale.grad
      module.zero_point -= 0.5 * module.zero_point.grad
      module.scale.grad = module.zero_point.grad = None
    state = state.replace(
      scale=jnp.asarray(module.scale.detach().numpy()).reshape(state.scale.shape),
      zero_point=jnp.asarray(module.zero_point.detach().numpy()).reshape(state.scale.shape),
    )
  ts, tz = module.calculate_qparams()
  s, z = fq.calculate_qparams(state)
  np.testing.assert_array_equal(bits(s).reshape(-1), bits(ts))
  np.testing.assert_array_equal(np.asarray(z).reshape(-1), tz.numpy())
  ours = jo.state_dict(fq, state)
  theirs = module.state_dict()
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert (ours[key].dtype, ours[key].shape) == (value.numpy().dtype, tuple(value.shape)), key
  back = jo.load_state_dict(fq, theirs)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, state))


def test_grad_factor_counts_the_global_batch_under_axis_name():
  fq = jo.LearnableFakeQuantize(
    observer=jo.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True
  )
  x = (np.random.default_rng(5).standard_normal((16, 3)) * 2).astype(np.float32)
  state = fq.init(x)
  state = fq.apply(state, x)[1].enable_param_learning()

  def loss(scale, x, axis_name=None):
    y, _ = fq.apply(state.replace(scale=scale), x, axis_name=axis_name)
    return (y**2).sum()

  @sharded
  def sharded_grad(scale, x):
    return jax.lax.psum(jax.grad(loss)(scale, x, "data"), "data")

  whole = jax.grad(loss)(state.scale, x)
  np.testing.assert_allclose(sharded_grad(state.scale, x), whole, rtol=1e-5)
  assert fq.grad_factor(x) == 1.0 / (48 * 255) ** 0.5


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(quant_min=5, quant_max=5), ValueError, "less than quant_max"),
    (dict(quant_min=1, quant_max=10), ValueError, "must include 0"),
    (
      dict(observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(qscheme=jo.per_channel_affine_float_qparams)),
      NotImplementedError,
      "float_qparams",
    ),
    (dict(channel_len=3), ValueError, "channel_len=3"),
    (dict(quant_min=-1, quant_max=255), ValueError, "out of bounds"),
  ],
)  # fmt: skip
def test_bad_configs_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    jo.LearnableFakeQuantize(**kwargs)


def test_gradients_are_zero_while_learning_is_disabled_and_flags_toggle():
  fq = jo.LearnableFakeQuantize(quant_min=0, quant_max=15, scale=0.2, zero_point=2.5)
  x = jnp.array([3.0, 0.0])
  state = fq.init(x).enable_param_learning()
  grad = jax.grad(lambda s, st: fq.apply(st.replace(scale=s), x)[0].sum())
  assert float(grad(state.scale, state)) == 12.0
  assert float(grad(state.scale, state.toggle_qparam_learning(False))) == 0.0
  observing = jo.enable_observer(state)
  assert bool(observing.static_enabled) and not bool(jo.disable_observer(observing).static_enabled)
  off = state.enable_static_observation()
  y, after = fq.apply(off, x)
  np.testing.assert_array_equal(y, x)
  assert float(after.scale) == pytest.approx(3.0 / 15.0)  # observed [0, 3]
