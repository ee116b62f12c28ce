"""jax_observers.qwix: jo observers as qwix's static activation ranges, on qwix's real int8 model.

A 2-block MLP-Mixer (Dense layers with GELU, LayerNorm, residuals) trained for a few seconds on
scikit-learn's digits. The scales qwix ends up with are checked against each observer's
``calculate_qparams`` on Dense inputs captured independently (``nn.intercept_methods`` on the float
model), and the int8 PTQ accuracy of jo's calibrators against qwix's own absmax calibration.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")
optax = pytest.importorskip("optax")
datasets = pytest.importorskip("sklearn.datasets")

import jax_observers as jo  # noqa: E402
import jax_observers.qwix  # noqa: E402
from jax_observers._src.ptq import qwix_bridge  # noqa: E402

# qwix 0.1.8's flax_util.unbox reads nnx.VariableState, which flax 0.12 deprecates on every call.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

C, TOKENS_HIDDEN, CHANNELS_HIDDEN = 32, 32, 64
SYM = {"dtype": jnp.int8, "qscheme": jo.per_tensor_symmetric}
CALIBRATORS = {
  "MinMax": jo.MinMaxObserver(**SYM),
  "Percentile": jo.HistogramPercentileObserver(**SYM),
  "MSE": jo.HistogramMSEObserver(**SYM),
  "Entropy": jo.HistogramEntropyObserver(**SYM),
}


def rules(method="absmax", **kw):
  return [
    qwix.QuantizationRule(
      weight_qtype="int8",
      act_qtype="int8",
      act_static_scale=True,
      act_calibration_method=method,
      **kw,
    )
  ]


class MixerBlock(nn.Module):
  @nn.compact
  def __call__(self, x):  # (B, S, C)
    y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
    y = nn.Dense(x.shape[1])(nn.gelu(nn.Dense(TOKENS_HIDDEN)(y)))
    x = x + jnp.swapaxes(y, 1, 2)
    return x + nn.Dense(C)(nn.gelu(nn.Dense(CHANNELS_HIDDEN)(nn.LayerNorm()(x))))


class Mixer(nn.Module):
  """Digits as 16 patches of 2x2 pixels -> 2 Mixer blocks -> mean over patches -> 10 classes."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(C)(x)
    for _ in range(2):
      x = MixerBlock()(x)
    return nn.Dense(10)(nn.LayerNorm()(x).mean(1))


@pytest.fixture(scope="module")
def setup():
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32).reshape(-1, 4, 2, 4, 2)
  x = x.transpose(0, 1, 3, 2, 4).reshape(-1, 16, 4)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  n = int(0.8 * len(x))
  train, test = (x[order[:n]], y[order[:n]]), (x[order[n:]], y[order[n:]])
  model, tx = Mixer(), optax.adam(3e-3)
  params = model.init(jax.random.key(0), train[0][:1])["params"]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb, yb):
    def loss(p):
      logits = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(0)
  for _ in range(400):
    idx = rng.integers(0, n, 128)
    params, opt = step(params, opt, train[0][idx], train[1][idx])
  batches = [train[0][i * 128 : (i + 1) * 128] for i in range(8)]
  return model, params, batches, test


def ptq_params(model, rule_list, params, quant_stats, x):
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rule_list))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
  return ptq, qwix.quantize_params(params, abstract, quant_stats)


def accuracy(logits, labels) -> float:
  return float(100 * np.mean(np.argmax(np.asarray(logits), -1) == labels))


def qwix_own_quant_stats(model, params, batches, method="absmax"):
  """qwix's own SRQ calibration: QtProvider with act_static_scale, quant_stats mutable."""
  qt_rules = [
    qwix.QtRule(
      weight_qtype="int8", act_qtype="int8", act_static_scale=True, act_calibration_method=method
    )
  ]
  qt = qwix.quantize_model(model, qwix.QtProvider(qt_rules))
  stats = qt.init(jax.random.key(0), batches[0])["quant_stats"]

  @jax.jit
  def step(stats, x):
    variables = {"params": params, "quant_stats": stats}
    return qt.apply(variables, x, mutable=["quant_stats"])[1]["quant_stats"]

  for x in batches:
    stats = step(stats, x)
  return stats


def dense_inputs(model, params, batches) -> dict:
  """Every nn.Dense input of the float model per batch, keyed by module path (flax's own hook)."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      seen.setdefault(context.module.path, []).append(args[0])
    return next_fun(*args, **kwargs)

  for x in batches:
    with nn.intercept_methods(record):
      model.apply({"params": params}, x)
  return seen


def reference_qparams(observer, xs) -> jo.QParams:
  state = observer.init(xs[0])
  for x in xs:
    state = observer.update(state, x)
  return observer.calculate_qparams(state)


def qwix_scale_for_absmax(absmax: np.ndarray) -> np.ndarray:
  stat = {"count": jnp.ones((), jnp.int32), "sum_of_absmax": jnp.asarray(absmax)}
  return np.asarray(qwix_bridge.qwix_qparams(stat, "int8")[0])


def assert_qwix_scale(got, want, where):
  """Bit for bit, or 1 ulp off where no absmax makes qwix compute ``want`` (the documented case)."""
  got = np.asarray(got, np.float32)
  want = np.broadcast_to(np.asarray(want, np.float32), got.shape)
  off = got != want
  if not off.any():
    return
  ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
  assert ulps.max() <= 1, f"{where}: {got} vs {want}"
  start = want * np.float32(127.5)
  for k in range(-64, 65):  # no absmax near 127.5 * want gives want: qwix cannot represent it
    cand = start.view(np.int32) + k
    assert not np.any((qwix_scale_for_absmax(cand.view(np.float32)) == want)[off]), where


@pytest.fixture(scope="module")
def calibrated(setup):
  model, params, batches, test = setup
  out = {}
  for name, observer in CALIBRATORS.items():
    states, configs = jo.qwix.observe(model, rules(), params, batches, observer=observer)
    quant_stats = jo.qwix.to_quant_stats(model, rules(), states, configs, batches[0])
    ptq, qparams = ptq_params(model, rules(), params, quant_stats, test[0])
    out[name] = (observer, states, quant_stats, ptq, qparams)
  return out


def test_int8_ptq_accuracy_best_jo_calibrator_beats_qwix_absmax(setup, calibrated):
  model, params, batches, (x_test, y_test) = setup
  float_acc = accuracy(model.apply({"params": params}, x_test), y_test)
  own = qwix_own_quant_stats(model, params, batches)
  ptq, qparams = ptq_params(model, rules(), params, own, x_test)
  table = {
    "float": float_acc,
    "qwix absmax": accuracy(ptq.apply({"params": qparams}, x_test), y_test),
  }
  for name, (*_, ptq, qparams) in calibrated.items():
    table[f"jo {name}"] = accuracy(ptq.apply({"params": qparams}, x_test), y_test)
  print("\n" + "\n".join(f"{k:<16} {v:6.2f}%" for k, v in table.items()))
  best = max(v for k, v in table.items() if k.startswith("jo "))
  assert best >= table["qwix absmax"], table
  assert table["float"] > 90, table  # the model learned; int8 is compared on a real task
  assert min(v for k, v in table.items() if k.startswith("jo ")) >= table["float"] - 2.0, table


def site(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_observers_see_the_dense_inputs(setup, calibrated):
  """The op inputs qwix's interception shows the observers are the float model's Dense inputs."""
  model, params, batches, _ = setup
  _, states, quant_stats, *_ = calibrated["MinMax"]
  own = qwix_own_quant_stats(model, params, batches[:1])
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(quant_stats) == shapes(own)  # the same op inputs, names and shapes as qwix's own
  inputs = dense_inputs(model, params, batches)
  assert len(inputs) == 10  # embed, 2 blocks x 4, head
  for path, xs in inputs.items():
    state = site(states, path)["dot_general0_lhs"]
    lo, hi = min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)
    # The calibration is its own XLA program (jit, fused): activations agree to float32 rounding.
    np.testing.assert_allclose([state.min_val, state.max_val], [lo, hi], rtol=1e-5)
    if path == ("Dense_0",):  # the model input itself: bit for bit
      assert (float(state.min_val), float(state.max_val)) == (lo, hi)


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_qwix_scales_equal_calculate_qparams(setup, calibrated, name):
  model, params, batches, _ = setup
  observer, states, _, _, qparams = calibrated[name]
  paths = list(dense_inputs(model, params, batches[:1]))
  for path in paths:
    want = observer.calculate_qparams(site(states, path)["dot_general0_lhs"])
    got = site(qparams, path)
    assert "dot_general0_lhs_zero_point" not in got
    got = got["dot_general0_lhs_scale"].array
    assert got.shape == ((1, 1) if path == ("Dense_1",) else (1, got.shape[1], 1))  # per position
    assert_qwix_scale(got, want.scale, "/".join(path))


def test_affine_observers_map_scale_and_zero_point(setup):
  model, params, batches, (x_test, y_test) = setup
  observer = jo.HistogramMSEObserver()  # quint8, per_tensor_affine: zero points in [0, 255]
  quant_stats = jo.qwix.calibrate(model, rules("minmax"), params, batches, observer=observer)
  states, _ = jo.qwix.observe(model, rules("minmax"), params, batches, observer=observer)
  ptq, qparams = ptq_params(model, rules("minmax"), params, quant_stats, x_test)
  for path in dense_inputs(model, params, batches[:1]):
    want = observer.calculate_qparams(site(states, path)["dot_general0_lhs"])
    scale, zp = (
      site(qparams, path)[k] for k in ("dot_general0_lhs_scale", "dot_general0_lhs_zero_point")
    )
    scale = scale.array
    ulps = np.abs(np.asarray(scale).view(np.int32) - np.asarray(want.scale).view(np.int32))
    assert ulps.max() <= 1, path  # see the module doc's table: affine scales may be 1 ulp off
    np.testing.assert_array_equal(zp, np.broadcast_to(want.zero_point - 128, zp.shape))
  assert accuracy(ptq.apply({"params": qparams}, x_test), y_test) > 90


def test_observers_per_rule_and_per_position(setup):
  model, params, batches, x_test = *setup[:3], setup[3][0]
  per_position = jo.PerChannelMinMaxObserver(
    ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric
  )
  rule_list = rules(module_path="MixerBlock_0/.*") + rules()
  quant_stats = jo.qwix.calibrate(
    model,
    rule_list,
    params,
    batches,
    observer=CALIBRATORS["MinMax"],
    observers={"MixerBlock_0/.*": per_position},
  )
  states, configs = jo.qwix.observe(
    model,
    rule_list,
    params,
    batches,
    observer=CALIBRATORS["MinMax"],
    observers={"MixerBlock_0/.*": per_position},
  )
  _, qparams = ptq_params(model, rule_list, params, quant_stats, x_test)
  for path in dense_inputs(model, params, batches[:1]):
    observer = per_position if path[0] == "MixerBlock_0" else CALIBRATORS["MinMax"]
    assert site(configs, path)["dot_general0_lhs"] == observer
    want = observer.calculate_qparams(site(states, path)["dot_general0_lhs"]).scale
    got = site(qparams, path)["dot_general0_lhs_scale"].array
    assert_qwix_scale(got, want.reshape((1, -1, 1)) if want.ndim else want, "/".join(path))
    if path[0] == "MixerBlock_0":
      assert len(np.unique(np.asarray(got))) > 1  # one scale per position, as qwix's own


def test_quant_stat_symmetric_one_element_is_exact_for_every_torch_scale():
  observer = CALIBRATORS["MinMax"]
  amax = np.random.default_rng(0).lognormal(0.0, 3.0, 2000).astype(np.float32)
  qparams = jax.vmap(lambda a: reference_qparams(observer, [jnp.stack([-a, a])]))(amax)
  for s in np.asarray(qparams.scale)[:400]:
    qp = jo.QParams(scale=jnp.float32(s), zero_point=jnp.int32(0))
    stat = jo.qwix.quant_stat(observer, qp, qtype="int8", shape=(1, 1))
    assert qwix_scale_for_absmax(stat["sum_of_absmax"])[0, 0] == s


def test_quant_stat_per_position_within_one_ulp_and_mostly_exact():
  observer = jo.PerChannelMinMaxObserver(
    ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric
  )
  x = np.random.default_rng(1).standard_normal((32, 4000)).astype(np.float32)
  x *= np.random.default_rng(2).lognormal(0.0, 2.0, 4000).astype(np.float32)
  qparams = reference_qparams(observer, [x])
  stat = jo.qwix.quant_stat(observer, qparams, qtype=jnp.int8, shape=(1, 4000, 1))
  got = qwix_scale_for_absmax(stat["sum_of_absmax"]).ravel()
  want = np.asarray(qparams.scale)
  ulps = np.abs(got.view(np.int32) - want.view(np.int32))
  assert ulps.max() <= 1 and np.mean(ulps == 0) > 0.99


@pytest.mark.parametrize(
  ("observer", "method", "match"),
  [
    (jo.MinMaxObserver(**SYM, reduce_range=True), "absmax", r"qwix's symmetric int8 grid"),
    (jo.MinMaxObserver(), "absmax", r"act_calibration_method='minmax'"),
    (CALIBRATORS["MinMax"], "minmax", r"act_calibration_method='absmax'"),
    (jo.Float8Observer(), "absmax", r"has no integer grid"),
  ],
)
def test_mismatched_observers_raise(setup, observer, method, match):
  model, params, batches, _ = setup
  with pytest.raises((ValueError, TypeError), match=match):
    jo.qwix.calibrate(model, rules(method), params, batches[:1], observer=observer)


def test_bad_arguments_raise(setup):
  model, params, batches, _ = setup
  with pytest.raises(ValueError, match="No observer for the rule"):
    jo.qwix.calibrate(model, rules(), params, batches[:1])
  with pytest.raises(ValueError, match="no rule's module_path"):
    jo.qwix.calibrate(
      model, rules(), params, batches[:1], observers={"Dense_9": CALIBRATORS["MSE"]}
    )
  with pytest.raises(ValueError, match="batches is empty"):
    jo.qwix.calibrate(model, rules(), params, [], observer=CALIBRATORS["MinMax"])
  fp8 = [
    qwix.QuantizationRule(weight_qtype="int8", act_qtype="float8_e4m3fn", act_static_scale=True)
  ]
  with pytest.raises(ValueError, match="integer grids only"):
    jo.qwix.calibrate(model, fp8, params, batches[:1], observer=CALIBRATORS["MinMax"])


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(8)(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(
      _Layer,
      variable_axes={"params": 0, "quant_stats": 0},
      split_rngs={"params": True},
      length=3,
    )
    return layers()(x, None)[0]


def test_scanned_layers_qwix_cannot_and_calibrate_says_so():
  model, x = _Scanned(), jax.random.normal(jax.random.key(0), (4, 8))
  params = model.init(jax.random.key(1), x)["params"]
  with pytest.raises(NotImplementedError, match="cannot PTQ scanned layers"):
    jo.qwix.calibrate(model, rules(), params, [x], observer=CALIBRATORS["MinMax"])
  # What the module doc quotes: qwix's own calibration + quantize_params on the scanned stats,
  stats = qwix_own_quant_stats(model, params, [x])
  with pytest.raises(ValueError, match="truth value of an array with more than one element"):
    ptq_params(model, rules(), params, stats, x)
  # and weight-only PTQ of the scanned layers.
  ptq, qparams = ptq_params(model, [qwix.QuantizationRule(weight_qtype="int8")], params, {}, x)
  with pytest.raises(ValueError, match="disagrees with leading axis sizes"):
    ptq.apply({"params": qparams}, x)


class _Attention(nn.Module):
  """An activation x activation einsum and a jnp.dot with a param: qwix names lhs and rhs."""

  @nn.compact
  def __call__(self, x):  # (B, S, K)
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    h = jnp.dot(x, w)
    scores = jnp.einsum("bsk,btk->bst", h, h)
    return nn.Dense(4)(scores)


def test_einsum_and_dot_inputs_get_qwix_names_and_exact_scales():
  model = _Attention()
  x = jax.random.normal(jax.random.key(0), (6, 5, 3))
  params = model.init(jax.random.key(1), x)["params"]
  observer = CALIBRATORS["MSE"]
  states, configs = jo.qwix.observe(model, rules(), params, [x[:3], x[3:]], observer=observer)
  quant_stats = jo.qwix.to_quant_stats(model, rules(), states, configs, x)
  assert set(quant_stats) == {"dot_general0_lhs", "einsum0_lhs", "einsum0_rhs", "Dense_0"}
  ptq, qparams = ptq_params(model, rules(), params, quant_stats, x)
  for name in ("dot_general0_lhs", "einsum0_lhs", "einsum0_rhs"):
    want = observer.calculate_qparams(states[name]).scale
    assert_qwix_scale(qparams[f"{name}_scale"].array, want, name)
  y, y_float = ptq.apply({"params": qparams}, x), model.apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(y - y_float))) < 0.05 * float(jnp.max(jnp.abs(y_float)))


class _WithDropout(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(4)(h)


def test_model_kwargs_reach_every_call():
  model, x = _WithDropout(), jax.random.normal(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x, train=False)["params"]
  observer = CALIBRATORS["MinMax"]
  kw = {"model_kwargs": {"train": False}}
  quant_stats = jo.qwix.calibrate(model, rules(), params, [x], observer=observer, **kw)
  states, _ = jo.qwix.observe(model, rules(), params, [x], observer=observer, **kw)
  hidden = nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
  assert float(states["Dense_1"]["dot_general0_lhs"].max_val) == pytest.approx(float(hidden.max()))
  assert set(quant_stats) == {"Dense_0", "Dense_1"}


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_conv_input_gets_qwix_name_and_exact_scale():
  model, x = _ConvNet(), jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  params = model.init(jax.random.key(1), x)["params"]
  observer = CALIBRATORS["Percentile"]
  states, configs = jo.qwix.observe(model, rules(), params, [x], observer=observer)
  quant_stats = jo.qwix.to_quant_stats(model, rules(), states, configs, x)
  _, qparams = ptq_params(model, rules(), params, quant_stats, x)
  state = states["Conv_0"]["conv_general_dilated0_lhs"]
  got = qparams["Conv_0"]["conv_general_dilated0_lhs_scale"].array
  assert got.shape == (1, 1, 1, 1)
  assert_qwix_scale(got, observer.calculate_qparams(state).scale, "Conv_0")
