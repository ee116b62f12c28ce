"""Weight quantization over Flax params: per-leaf rules, SQNR, and the round-trip error bound.

Bounds, inside the representable range: integer codes :math:`|w - \\hat w| \\le s/2`, fp8 and MX
elements :math:`|w - \\hat w| \\le s \\cdot \\mathrm{ulp}(|w/s|)/2` (the format's spacing at that
magnitude), each plus float32 rounding of the scale arithmetic (a few ulps of :math:`|w|`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_observers as jo


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(32, (3, 3))(x)
    x = nn.Dense(300)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(nn.relu(x))


@pytest.fixture(scope="module")
def params():
  return jax.jit(Model().init)(jax.random.key(0), jnp.ones((1, 4, 4, 16)))["params"]


def test_int4_rules_quantize_kernels_skip_biases_and_report_sqnr(params):
  quantized, report = jo.quantize_params(params, jo.int4_weight_rules(group_size=128))
  assert sorted(report) == ["Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"]
  for layer in ("Conv_0", "Dense_0", "Dense_1"):
    assert quantized[layer]["bias"] is params[layer]["bias"]
    leaf = quantized[layer]["kernel"]
    assert isinstance(leaf, jo.QuantizedArray) and leaf.qvalue.dtype == jnp.int4
    w = np.asarray(params[layer]["kernel"], np.float64)
    w_hat = np.asarray(leaf.dequantize(), np.float64)
    expected = 20 * np.log10(np.linalg.norm(w) / np.linalg.norm(w - w_hat))
    assert abs(float(report[f"{layer}/kernel"]) - expected) < 1e-3
    assert 15 < expected < 25  # int4 with per-group scales on Gaussian-like weights
  # Conv kernel (3, 3, 16, 32): 16 input channels, one partial group of 128 per output channel
  assert quantized["Conv_0"]["kernel"].qparams.scale.shape == (3, 3, 1, 32)
  assert quantized["Dense_0"]["kernel"].qparams.scale.shape == (4, 300)  # 512 inputs: 4 groups
  assert quantized["Dense_1"]["kernel"].qparams.scale.shape == (3, 10)  # 300 inputs: 2 + a partial
  restored = jo.dequantize_params(quantized)
  assert jax.tree.structure(restored) == jax.tree.structure(params)


def test_callable_rules_default_and_refusals(params):
  int8 = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerAxis(-1)
  )
  _, report = jo.quantize_params(params, lambda path, leaf: int8 if leaf.ndim == 2 else None)
  assert sorted(report) == ["Dense_0/kernel", "Dense_1/kernel"]
  assert all(float(v) > 35 for v in report.values())
  _, report = jo.quantize_params(
    params, [(r"bias$", None)], default=int8.replace(granularity=jo.PerTensor())
  )
  assert "Conv_0/kernel" in report and "Dense_0/bias" not in report
  with pytest.raises(TypeError, match="PlaceholderObserver cannot quantize weights"):
    jo.quantize_params(params, [(r"kernel$", jo.PlaceholderObserver())])


@pytest.mark.parametrize(
  "observer",
  [
    jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric),
    jo.MinMaxObserver(dtype=jnp.uint8),
    jo.HistogramObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric, bins=256),
  ],
  ids=["per-channel-int8", "minmax-uint8", "histogram-int8"],
)
def test_uniform_observers_are_quantizers_of_weights(params, observer):
  """Every uniform observer declares the quantizer capability: its codes are torch's
  clip(rne(w / s) + z) (NumPy reference, torch multiplies by the float32 inverse scale)."""
  assert isinstance(observer, jo.Quantizer)
  quantized, report = jo.quantize_params(params, [(r"Dense_0/kernel$", observer)])
  leaf = quantized["Dense_0"]["kernel"]
  w = np.asarray(params["Dense_0"]["kernel"], np.float32)
  scale = np.asarray(leaf.qparams.scale, np.float32)
  zero_point = np.asarray(leaf.qparams.zero_point, np.int64)
  qmin, qmax = observer.quant_range
  inv = np.float32(1) / scale
  ref = np.clip(np.rint(w * inv) + zero_point, qmin, qmax)
  np.testing.assert_array_equal(np.asarray(leaf.qvalue, np.int64), ref)
  assert leaf.qvalue.dtype == observer.dtype
  deq = np.asarray(leaf.dequantize())
  np.testing.assert_array_equal(deq, ((ref - zero_point) * scale).astype(np.float32))
  assert float(report["Dense_0/kernel"]) > 30


def _affine(mapping, dtype, granularity, **kw):
  return jo.AffineQuantizedMinMaxObserver(
    mapping_type=mapping, target_dtype=dtype, granularity=granularity, pad_partial_blocks=True, **kw
  )


S, A = jo.MappingType.SYMMETRIC, jo.MappingType.ASYMMETRIC
INT_FORMATS = {
  "int8-per-channel": _affine(S, jnp.int8, jo.PerAxis(-1)),
  "uint4-asym-g128": _affine(A, jnp.uint4, jo.PerBlock((128, 1))),
  "int4-no-clipping-g32": _affine(
    jo.MappingType.SYMMETRIC_NO_CLIPPING_ERR, jnp.int4, jo.PerGroup(32)
  ),
  "uint4-tinygemm-float-zp": _affine(
    A,
    jnp.uint4,
    jo.PerBlock((64, 1)),
    preserve_zero=False,
    zero_point_domain=jo.ZeroPointDomain.FLOAT,
  ),
  "int2-per-channel": _affine(S, jnp.int2, jo.PerAxis(-1)),
  "int8-pow2-ceil": jo.Pow2ScaleObserver(observer=_affine(S, jnp.int8, jo.PerAxis(-1))),
}
FLOAT_FORMATS = {
  "fp8-e4m3-per-row": jo.Float8Observer(granularity=jo.PerRow()),
  "fp8-e4m3-block128": jo.Float8Observer(
    granularity=jo.PerBlock((128, 32)), pad_partial_blocks=True
  ),
  "mxfp8-floor": jo.MXObserver(),
  "mxfp4-rceil": jo.MXObserver(
    elem_dtype=jnp.float4_e2m1fn, scaling_mode=jo.ScaleCalculationMode.RCEIL
  ),
  "mxfp4-even": jo.MXObserver(
    elem_dtype=jnp.float4_e2m1fn, scaling_mode=jo.ScaleCalculationMode.EVEN
  ),
}


def weight(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((300, 64)) * np.exp(rng.uniform(-4, 4, (1, 64)))
  return (w + rng.uniform(-0.5, 2.0, (1, 64)) * np.abs(w).mean(0)).astype(np.float32)


def _per_element(obs, array, w):
  inner = getattr(obs, "observer", obs)
  layout = inner.layout(w)
  return np.asarray(layout.unview(jnp.broadcast_to(layout.broadcast(array), layout.view_shape)))


@pytest.mark.parametrize("name", list(INT_FORMATS))
def test_integer_round_trip_is_within_half_a_step(name):
  obs = INT_FORMATS[name]
  w = weight()
  leaf, _ = jo.quantize_array(obs, w)
  w_hat = np.asarray(jax.jit(jo.QuantizedArray.dequantize)(leaf), np.float64)
  s = _per_element(obs, leaf.qparams.scale, w).astype(np.float64)
  z = _per_element(obs, leaf.qparams.zero_point, w).astype(np.float64)
  err = np.abs(w - w_hat)
  inner = getattr(obs, "observer", obs)
  qmin, qmax = inner.quant_range
  slack = 2.0**-21 * (np.abs(w) + s)
  if inner.zero_point_domain == jo.ZeroPointDomain.FLOAT:
    mid = (qmin + qmax + 1) / 2
    slack = slack + 2.0**-21 * (np.abs(z) + s * (qmax - qmin))
    low, high = z + (qmin - mid - 0.5) * s, z + (qmax - mid + 0.5) * s
  else:
    low, high = (qmin - z - 0.5) * s, (qmax - z + 0.5) * s
  inside = (w >= low - slack) & (w <= high + slack)
  assert inside.mean() == 1.0  # min/max calibration covers every weight
  assert np.all(err <= s / 2 + slack), f"{name}: worst {np.max(err / s)} steps"


def _spacing(v, dtype):
  info = ml_dtypes.finfo(dtype)
  e = np.maximum(np.floor(np.log2(np.maximum(v, np.finfo(np.float32).tiny))), info.minexp)
  return 2.0 ** (e - info.nmant)


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_float_round_trip_is_within_half_a_spacing(name):
  obs = FLOAT_FORMATS[name]
  w = weight(1)
  leaf, _ = jo.quantize_array(obs, w)
  dtype = getattr(obs, "dtype", getattr(obs, "elem_dtype", None))
  w_hat = np.asarray(leaf.dequantize(), np.float64)
  s = _per_element(obs, leaf.qparams.scale, w).astype(np.float64)
  v = np.abs(w) / s
  fmax = float(ml_dtypes.finfo(dtype).max)
  # the range: every magnitude that rounds to at most fmax (EVEN may put amax just above fmax)
  inside = v <= (fmax + _spacing(fmax, dtype) / 2) * (1 + 2.0**-20)
  if name == "mxfp8-floor":
    assert inside.mean() < 1.0  # FLOOR may saturate a block's largest values (OCP spec rule)
  else:
    assert inside.all()
  bound = s * _spacing(v, dtype) / 2 + 2.0**-21 * np.abs(w)
  err = np.abs(w - w_hat)
  assert np.all(err[inside] <= bound[inside]), f"{name}: {np.max(err / bound)}"
  saturated = np.float32(fmax) * s[~inside].astype(np.float32)
  np.testing.assert_array_equal(np.abs(w_hat[~inside]).astype(np.float32), saturated)  # not NaN


def _sqnr_np(w, w_hat):
  w, w_hat = np.asarray(w, np.float64), np.asarray(w_hat, np.float64)
  return 20 * np.log10(np.linalg.norm(w) / np.linalg.norm(w - w_hat))


@pytest.mark.parametrize("form", ["keyword", "pattern", "rule"])
def test_stacked_layers_are_quantized_one_by_one(form):
  """A scanned kernel (L, in, out) with one tiny layer: per-axis ranges never span layers."""
  kernel = jax.random.normal(jax.random.key(0), (3, 64, 16))
  kernel = kernel.at[1].multiply(0.01)
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerAxis(-1)
  )
  params = {"blocks": {"kernel": kernel}}
  if form == "keyword":
    quantized, report = jo.quantize_params(params, [("kernel$", obs)], stacked_axes=1)
  elif form == "pattern":
    quantized, report = jo.quantize_params(
      params, [("kernel$", obs)], stacked_axes=[("blocks/", 1)]
    )
  else:
    quantized, report = jo.quantize_params(params, [("kernel$", obs, 1)])
  leaf = quantized["blocks"]["kernel"]
  assert leaf.qparams.scale.shape == (3, 16)
  restored = jo.dequantize_params(quantized)["blocks"]["kernel"]
  for i in range(3):
    alone, db = jo.quantize_array(obs, kernel[i])
    np.testing.assert_array_equal(leaf.qvalue[i], alone.qvalue)
    np.testing.assert_array_equal(restored[i], alone.dequantize())
    np.testing.assert_allclose(report[f"blocks/kernel[{i}]"], db, rtol=1e-5)
    np.testing.assert_allclose(db, _sqnr_np(kernel[i], alone.dequantize()), rtol=1e-4)
  np.testing.assert_allclose(report["blocks/kernel"], _sqnr_np(kernel, restored), rtol=1e-4)
  # merged (no stacked_axes), the tiny layer loses most of its signal; one by one it keeps it
  merged, merged_report = jo.quantize_params(params, [("kernel$", obs)])
  tiny = _sqnr_np(kernel[1], jo.dequantize_params(merged)["blocks"]["kernel"][1])
  assert tiny < report["blocks/kernel[1]"] - 20
  assert "blocks/kernel[1]" not in merged_report


def test_stacked_axes_refusals():
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerAxis(-1)
  )
  with pytest.raises(ValueError, match=r"stacked_axes=2 must be in \[0, 2\)"):
    jo.quantize_array(obs, jnp.ones((4, 4)), stacked_axes=2)
  with pytest.raises(TypeError, match="stacked_axes=True must be an int"):
    jo.quantize_array(obs, jnp.ones((4, 4)), stacked_axes=True)
