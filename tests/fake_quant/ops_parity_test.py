"""fake_quantize_per_{tensor,channel}_affine, quantize and dequantize against torch 2.13, bit for bit."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo

torch = pytest.importorskip("torch")

# Jitted entry points: one compile per static configuration keeps the file fast.
FQ_TENSOR = jax.jit(jo.fake_quantize_per_tensor_affine, static_argnums=(3, 4))
FQ_CHANNEL = jax.jit(jo.fake_quantize_per_channel_affine, static_argnums=(3, 4, 5))
QUANTIZE = jax.jit(jo.quantize, static_argnames=("dtype", "axis", "quant_min", "quant_max"))
DEQUANTIZE = jax.jit(jo.dequantize, static_argnames=("axis", "dtype"))

RANGES = [(0, 255), (-128, 127), (0, 15), (-32768, 32767), (-8, 7), (0, 127)]
FLOATS = {
  "float32": (np.float32, jnp.float32, torch.float32),
  "bfloat16": (np.float32, jnp.bfloat16, torch.bfloat16),
  "float16": (np.float32, jnp.float16, torch.float16),
}


def bits(a):
  """Raw bits, so -0.0 != 0.0; every NaN becomes one pattern (payloads are platform noise)."""
  a = np.array(a)
  a[np.isnan(a)] = np.nan
  return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def as_torch(a, dtype=None):
  t = torch.from_numpy(np.array(np.asarray(a, np.float32)))
  return t.to(dtype) if dtype is not None else t


def to_numpy(t):
  return t.detach().float().numpy() if t.dtype != torch.float32 else t.detach().numpy()


def hard_inputs(rng, scale, zero_point, qmin, qmax, n):
  """Random values plus exact ties (k + 1/2) s, window edges, NaN and infinities."""
  x = rng.standard_normal(n) * scale * (qmax - qmin) * rng.uniform(0.05, 1.5)
  k = rng.integers(qmin - zero_point - 3, qmax - zero_point + 3, n // 4)
  x[: n // 4] = (k + 0.5) * scale
  x[n // 4 : n // 4 + 6] = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0]
  return x.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "axis"))
def jax_value_and_grad(x, scale, zero_point, dy, *, qmin, qmax, axis=None):
  """Output and input gradient for a batch of trials (leading axis), per tensor or per channel."""

  def one(x, scale, zero_point, dy):
    if axis is None:
      f = lambda a: jo.fake_quantize_per_tensor_affine(a, scale, zero_point, qmin, qmax)
    else:
      f = lambda a: jo.fake_quantize_per_channel_affine(a, scale, zero_point, axis, qmin, qmax)
    y, vjp = jax.vjp(f, x)
    return y, vjp(dy)[0]

  return jax.vmap(one)(x, scale, zero_point, dy)


def torch_value_and_grad(x, scale, zero_point, dy, tdtype, *, qmin, qmax, axis=None):
  ys, dxs = [], []
  for i in range(len(x)):
    xt = as_torch(x[i], tdtype).requires_grad_()
    if axis is None:
      y = torch.fake_quantize_per_tensor_affine(xt, float(scale[i]), int(zero_point[i]), qmin, qmax)
    else:
      s, z = torch.from_numpy(scale[i]), torch.from_numpy(zero_point[i])
      y = torch.fake_quantize_per_channel_affine(xt, s, z, axis, qmin, qmax)
    y.backward(as_torch(dy[i], tdtype))
    ys.append(to_numpy(y))
    dxs.append(to_numpy(xt.grad))
  return np.stack(ys), np.stack(dxs)


def as_jax(a, dtype):
  return jnp.asarray(a).astype(dtype)


@pytest.mark.parametrize("dtype", list(FLOATS))
def test_per_tensor_forward_and_gradient_match_torch(dtype):
  _, jdt, tdt = FLOATS[dtype]
  rng = np.random.default_rng(1)
  for qmin, qmax in RANGES:
    trials = 4
    scale = rng.uniform(1e-3, 2.0, trials).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, trials).astype(np.int32)
    x = np.stack([hard_inputs(rng, scale[i], zp[i], qmin, qmax, 300) for i in range(trials)])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy[:, :3] = [np.nan, -1.0, -0.0]
    y, dx = jax_value_and_grad(as_jax(x, jdt), scale, zp, as_jax(dy, jdt), qmin=qmin, qmax=qmax)
    ty, tdx = torch_value_and_grad(x, scale, zp, dy, tdt, qmin=qmin, qmax=qmax)
    assert y.dtype == jdt
    np.testing.assert_array_equal(bits(np.asarray(y, np.float32)), bits(ty))
    np.testing.assert_array_equal(bits(np.asarray(dx, np.float32)), bits(tdx))


def test_eager_equals_jit():
  rng = np.random.default_rng(11)
  x = jnp.asarray(hard_inputs(rng, 0.05, 3, 0, 255, 64))[None]

  def per_tensor(a):
    return jo.fake_quantize_per_tensor_affine(a, 0.05, 3, 0, 255)

  def per_channel(a):
    return jo.fake_quantize_per_channel_affine(a, np.array([0.05]), np.array([3.5]), -2, 0, 255)

  for f in (per_tensor, per_channel):
    np.testing.assert_array_equal(bits(f(x)), bits(jax.jit(f)(x)))
    grad = jax.grad(lambda a, f=f: f(a).sum())
    np.testing.assert_array_equal(bits(grad(x)), bits(jax.jit(grad)(x)))


def test_torch_edge_cases_e13_e14_e15():
  @jax.jit
  def cases(e13, e14, e15):
    return (
      jo.fake_quantize_per_tensor_affine(e13, 0.7506142854690552, 0, -1000, 1000),
      jax.grad(lambda a: jo.fake_quantize_per_tensor_affine(a, 0.5, 2, 0, 10).sum())(e14),
      jo.fake_quantize_per_tensor_affine(e15, 0.1, 0, -128, 127),
    )

  x13 = np.array([-356.9170837402344], np.float32)
  y13, g14, y15 = cases(
    x13, jnp.array([-1.251, -1.25, 4.25, 4.251]), jnp.array([np.nan, np.inf, -np.inf])
  )
  s = 0.7506142854690552
  assert (
    float(y13[0])
    == torch.fake_quantize_per_tensor_affine(torch.from_numpy(x13), s, 0, -1000, 1000).item()
  )
  assert float(y13[0]) == float(np.float32(-475) * np.float32(s))  # not rne(x / s) = -476
  assert g14.tolist() == [0.0, 1.0, 1.0, 0.0]
  assert y15.tolist() == [
    float(np.float32(-12.8)),
    float(np.float32(12.7)),
    float(np.float32(-12.8)),
  ]


def test_tensor_overload_truncates_float_zero_point_and_skips_range_check():
  x = jnp.array([0.5, 1.5])
  for zp in (2.7, 20.0):
    got = FQ_TENSOR(x, jnp.array([0.5]), jnp.array([zp]), 0, 10)
    want = torch.fake_quantize_per_tensor_affine(
      torch.tensor([0.5, 1.5]), torch.tensor([0.5]), torch.tensor([zp]), 0, 10
    )
    assert got.tolist() == want.tolist()
  assert jo.fake_quantize_per_tensor_affine(
    jnp.array([1.0]), jnp.array(0.5), jnp.array(20, jnp.int32), 0, 10
  ).tolist() == [-5.0]


def fma_sensitive(rng, scale, zero_point, n):
  """Inputs whose code differs between rne(rn(rn(x/s) + z)) and rne(rn(x/s + z)) (torch's FMA)."""
  inv = np.float32(1) / scale
  k = rng.integers(-100, 100, 4000)
  center = ((k + 0.5 - np.float64(zero_point)) / np.float64(inv)).astype(np.float32)
  x = (center.view(np.int32)[:, None] + np.arange(-8, 9)).reshape(-1).view(np.float32)
  plain = np.rint(zero_point + x * inv)
  fused = np.rint(np.float32(x.astype(np.float64) * np.float64(inv) + np.float64(zero_point)))
  return x[plain != fused][:n]


@pytest.mark.parametrize("zp_kind", ["int", "float"])
@pytest.mark.parametrize("dtype", list(FLOATS))
def test_per_channel_forward_and_gradient_match_torch(dtype, zp_kind):
  _, jdt, tdt = FLOATS[dtype]
  rng = np.random.default_rng(2)
  shape = (3, 40, 5)
  for axis, (qmin, qmax) in [(0, RANGES[0]), (1, RANGES[1]), (2, RANGES[4])]:
    trials, c = 3, shape[axis]
    others = [n for i, n in enumerate(shape) if i != axis]
    scale = rng.uniform(1e-3, 1.0, (trials, c)).astype(np.float32)
    if zp_kind == "int":
      zp = rng.integers(qmin, qmax + 1, (trials, c)).astype(np.int32)
    else:
      zp = rng.uniform(qmin, qmax, (trials, c)).astype(np.float32)
    n = int(np.prod(others))
    flat = np.stack(
      [
        np.stack([hard_inputs(rng, scale[t, i], int(zp[t, i]), qmin, qmax, n) for i in range(c)])
        for t in range(trials)
      ]
    )
    if zp_kind == "float" and dtype == "float32":
      fused = fma_sensitive(rng, scale[0, 0], zp[0, 0], 20)
      assert len(fused) >= 5
      m = min(len(fused), n - n // 4 - 6)  # after the ties and the special values
      flat[0, 0, n - m :] = fused[:m]
    x = np.moveaxis(flat.reshape(trials, c, *others), 1, axis + 1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = jax_value_and_grad(
      as_jax(x, jdt), scale, zp, as_jax(dy, jdt), qmin=qmin, qmax=qmax, axis=axis
    )
    ty, tdx = torch_value_and_grad(x, scale, zp, dy, tdt, qmin=qmin, qmax=qmax, axis=axis)
    y = np.asarray(y, np.float32)
    inv = (np.float32(1) / scale).reshape([trials] + [c if i == axis else 1 for i in range(3)])
    positive_overflow = np.asarray(as_jax(x, jdt), np.float32) * inv >= 2.0**62
    assert positive_overflow.any()  # torch's x86 cast sends these to quant_min, we to quant_max
    np.testing.assert_array_equal(bits(y[~positive_overflow]), bits(ty[~positive_overflow]))
    np.testing.assert_array_equal(bits(np.asarray(dx, np.float32)), bits(tdx))


def test_per_channel_positive_overflow_saturates_where_torch_x86_gives_quant_min():
  x = np.array([[np.nan, np.inf, 1e30, -np.inf]], np.float32)
  ours = jo.fake_quantize_per_channel_affine(
    x, np.array([0.1], np.float32), np.array([0], np.int32), 0, -128, 127
  )
  theirs = torch.fake_quantize_per_channel_affine(
    torch.from_numpy(x), torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), 0, -128, 127
  )
  lo, hi = float(np.float32(-12.8)), float(np.float32(12.7))
  assert theirs.tolist() == [[lo, lo, lo, lo]]  # x86: int64(+inf) == INT64_MIN
  assert ours.tolist() == [[lo, hi, hi, lo]]  # like the per-tensor op, CUDA and ARM


def test_float64_inputs_match_torch():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5000)) * 20
  x[0, :50] = (np.arange(50) - 25 + 0.5) * np.float64(np.float32(0.0371))
  s32 = np.array([0.0371, 0.5], np.float32)
  with jax.enable_x64(True):
    xj = jnp.asarray(x)
    got = FQ_TENSOR(xj, 0.0371, 3, -128, 127)
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x.copy()), 0.0371, 3, -128, 127)
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    for zp in (np.array([3, -1], np.int32), np.array([3.3, -1.7], np.float32)):
      got = FQ_CHANNEL(xj, s32, zp, 0, -128, 127)
      want = torch.fake_quantize_per_channel_affine(
        torch.from_numpy(x.copy()), torch.from_numpy(s32), torch.from_numpy(zp), 0, -128, 127
      )
      np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_wide_int32_range_per_tensor():
  rng = np.random.default_rng(4)
  x = (rng.standard_normal(3000) * 3e7).astype(np.float32)
  x[:4] = [np.nan, np.inf, -np.inf, 3e38]
  qmin, qmax = -(2**31), 2**31 - 1
  for zp in (0, 2**30 + 7, -(2**31) + 5):
    got = FQ_TENSOR(x, 0.013, zp, qmin, qmax)
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 0.013, zp, qmin, qmax)
    np.testing.assert_array_equal(bits(got), bits(want.numpy()))


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda x: jo.fake_quantize_per_tensor_affine(x, 0.1, 0, 5, 4), "quant_min=5"),
    (lambda x: jo.fake_quantize_per_tensor_affine(x, 0.1, 300, 0, 255), "zero_point=300"),
    (lambda x: jo.fake_quantize_per_tensor_affine(x, 0.1, 1.5, 0, 255), "zero_point=1.5"),
    (lambda x: jo.fake_quantize_per_tensor_affine(x, jnp.ones(2), 0, 0, 255), "scale must hold one"),
    (lambda x: jo.fake_quantize_per_tensor_affine(x.astype(jnp.int32), 0.1, 0, 0, 255), "floating"),
    (lambda x: jo.fake_quantize_per_tensor_affine(x, 0.1, 0, 0, jnp.int32(255)), "quant_max="),
    (lambda x: jo.fake_quantize_per_channel_affine(x, np.ones(3, np.float32), np.zeros(3, np.int32), 2, 0, 9), "axis=2"),
    (lambda x: jo.fake_quantize_per_channel_affine(x, np.ones(4, np.float32), np.zeros(3, np.int32), 0, 0, 9), r"scale must have shape \(3,\)"),
    (lambda x: jo.fake_quantize_per_channel_affine(x, np.ones(3, np.float32), np.zeros(2, np.int32), 0, 0, 9), r"zero_point must have shape \(3,\)"),
    (lambda x: jo.fake_quantize_per_channel_affine(x, np.ones(3, np.float32), np.full(3, 10, np.int32), 0, 0, 9), r"\[0, 9\]"),
    (lambda x: jo.fake_quantize_per_channel_affine(x, np.ones(3, np.int32), np.zeros(3, np.int32), 0, 0, 9), "float array"),
    (lambda x: jo.quantize(x, 0.1, 0, dtype=jnp.int8, quant_max=200), "does not fit"),
    (lambda x: jo.quantize(x, 0.1, 0, dtype=jnp.float32), "not an integer dtype"),
  ],
)  # fmt: skip
def test_bad_arguments_raise_at_trace_time(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    jax.jit(call).lower(jnp.zeros((3, 4)))


def test_per_channel_accepts_negative_axis():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 3)), jnp.float32)
  s, z = jnp.array([0.1, 0.2, 0.3]), jnp.array([1, 2, 3], jnp.int32)
  np.testing.assert_array_equal(
    FQ_CHANNEL(x, s, z, -1, -128, 127),
    FQ_CHANNEL(x, s, z, 1, -128, 127),
  )


def test_no_gradient_reaches_scale_or_zero_point():
  x = jnp.array([0.3, 7.0])
  ds = jax.grad(lambda s: jo.fake_quantize_per_tensor_affine(x, s, jnp.array(0), 0, 15).sum())(
    jnp.float32(0.5)
  )
  assert float(ds) == 0.0


@pytest.mark.parametrize(
  "dtype, tdtype, qmin, qmax",
  [(jnp.uint8, torch.quint8, 0, 255), (jnp.int8, torch.qint8, -128, 127), (jnp.int32, torch.qint32, None, None)],
)  # fmt: skip
def test_quantize_dequantize_match_torch_on_finite_inputs(dtype, tdtype, qmin, qmax):
  rng = np.random.default_rng(6)
  x = (rng.standard_normal((4, 500)) * 30).astype(np.float32)
  s, zp = 0.0371, (3 if dtype != jnp.int32 else -7)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tq = torch.quantize_per_tensor(torch.from_numpy(x), s, zp, tdtype)
    sc, zc = np.array([0.37, 0.05, 1.3, 0.011], np.float32), np.array([3, -2, 0, 1], np.int64)
    if dtype == jnp.uint8:
      zc = zc + 10
    tqc = torch.quantize_per_channel(
      torch.from_numpy(x), torch.from_numpy(sc), torch.from_numpy(zc), 0, tdtype
    )
  q = QUANTIZE(x, s, zp, dtype=dtype, quant_min=qmin, quant_max=qmax)
  assert q.dtype == dtype
  np.testing.assert_array_equal(np.asarray(q), tq.int_repr().numpy())
  np.testing.assert_array_equal(bits(DEQUANTIZE(q, s, zp)), bits(tq.dequantize().numpy()))
  qc = QUANTIZE(x, sc, zc.astype(np.int32), dtype=dtype, axis=0)
  np.testing.assert_array_equal(np.asarray(qc), tqc.int_repr().numpy())
  np.testing.assert_array_equal(
    bits(DEQUANTIZE(qc, sc, zc, axis=0)), bits(tqc.dequantize().numpy())
  )


def test_quantize_keeps_fake_quant_semantics_for_nan_where_torch_quantize_differs():
  x = np.array([np.nan, np.inf, -np.inf], np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = torch.quantize_per_tensor(torch.from_numpy(x), 0.1, 3, torch.quint8).int_repr()
  assert theirs.tolist() == [255, 255, 0]  # torch.quantize_per_tensor: NaN -> quant_max
  assert QUANTIZE(x, 0.1, 3, dtype=jnp.uint8).tolist() == [0, 255, 0]  # the fake-quant code


@pytest.mark.parametrize("zp_kind", ["int", "float"])
def test_dequantize_of_quantize_is_fake_quantize(zp_kind):
  rng = np.random.default_rng(7)
  scale = rng.uniform(0.01, 0.2, 3).astype(np.float32)
  zp = (
    rng.integers(0, 16, 3).astype(np.int32)
    if zp_kind == "int"
    else rng.uniform(0, 15, 3).astype(np.float32)
  )
  x = hard_inputs(rng, 0.05, 5, 0, 15, 300).reshape(3, 100)
  q = QUANTIZE(x, scale, zp, dtype=jnp.uint4, axis=0)
  assert q.dtype == jnp.uint4
  fq = FQ_CHANNEL(x, scale, zp, 0, 0, 15)
  np.testing.assert_array_equal(bits(DEQUANTIZE(q, scale, zp, axis=0)), bits(fq))
  q = QUANTIZE(x, scale[0], 5, dtype=jnp.int8, quant_min=-8, quant_max=7)
  fq = FQ_TENSOR(x, float(scale[0]), 5, -8, 7)
  np.testing.assert_array_equal(bits(DEQUANTIZE(q, scale[0], 5, dtype=jnp.float32)), bits(fq))
