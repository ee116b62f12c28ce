"""Property tests against live torch 2.13: random configs and multi-batch inputs, bit for bit.

Inputs mix ordinary floats with ties (half-integers on a power-of-two grid), 1e+-30, zeros of
both signs and subnormals. Two documented deviations are applied to torch's side, not hidden:
XLA:CPU flushes subnormal inputs to zero (README, "Where we differ"), so torch is fed the flushed
batch; and a torch scale that is itself subnormal is out of scope (the same flush, row 13).

The example budget is fixed and small by default (the suite's time budget); set
``HYPOTHESIS_PROFILE=long`` for release checks (20x the examples, random seeds).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax_observers as jo

torch = pytest.importorskip("torch")
from torch.ao.quantization import fake_quantize as tfq  # noqa: E402
from torch.ao.quantization import observer as tobs  # noqa: E402
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME, assert_same  # noqa: E402

_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
# Hypothesis' failure report imports mypy_extensions, which warns; keep the report readable.
pytestmark = pytest.mark.filterwarnings(
  "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)


def budget(n: int):
  """``n`` examples by default, 20x that under ``HYPOTHESIS_PROFILE=long``; no deadline."""
  return settings(
    max_examples=n * 20 if _LONG else n,
    deadline=None,
    derandomize=not _LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


# Under the long profile a mismatch is counted, not raised, so one run reports counts per class.
EXAMPLES, MISMATCHES = collections.Counter(), collections.Counter()


def counted(fn):
  @functools.wraps(fn)
  def run(*args, **kwargs):
    EXAMPLES[fn.__name__] += 1
    try:
      fn(*args, **kwargs)
    except AssertionError:
      if not _LONG:
        raise
      MISMATCHES[fn.__name__] += 1

  return run


TINY = float(np.finfo(np.float32).tiny)
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1e-40, -1e-40, TINY, 3e-45, 1.0, -1.0]


@st.composite
def values(draw, n: int, *, huge: bool = True):
  """``n`` float32 values: ordinary, special (1e+-30, +-0, subnormals) and ties."""
  kind = draw(st.sampled_from(["normal", "special", "ties", "mixed"]))
  bound = float(np.float32(1e30)) if huge else 1e4
  plain = st.floats(-bound, bound, width=32, allow_subnormal=True)
  special = st.sampled_from([v for v in SPECIAL if huge or abs(v) < 1e4])
  tie = st.builds(lambda k, e: (k + 0.5) * 2.0**e, st.integers(-300, 300), st.integers(-8, 2))
  element = {
    "normal": plain,
    "special": special,
    "ties": tie,
    "mixed": st.one_of(plain, special, tie),
  }[kind]
  return np.array(draw(st.lists(element, min_size=n, max_size=n)), np.float32)


def near_zero(x) -> np.ndarray:
  """Values below twice the smallest normal to zero: where XLA:CPU flushed a subnormal
  intermediate (``tiny + c * (0 - tiny)``), the state differs from torch's by less than that."""
  x = np.array(x, np.float32)
  small = np.abs(x) < 2 * TINY
  x[small] = np.copysign(np.float32(0), x[small])
  return x


def flush(x: np.ndarray) -> np.ndarray:
  """Subnormals to zero of the same sign: what XLA:CPU reads (the documented deviation)."""
  x = np.array(x, np.float32)
  sub = (x != 0) & (np.abs(x) < TINY)
  x[sub] = np.copysign(np.float32(0), x[sub])
  return x


def torch_observer(obs):
  kwargs = {"dtype": TORCH_DTYPE[obs.dtype], "qscheme": TORCH_QSCHEME[obs.qscheme]}
  if obs.reduce_range and obs.qscheme.is_symmetric and obs.dtype == np.uint8:
    kwargs["dtype"] = torch.uint8
  for name in ("reduce_range", "quant_min", "quant_max", "eps", "averaging_constant", "ch_axis"):
    if hasattr(obs, name):
      kwargs[name] = getattr(obs, name)
  if isinstance(obs, jo.HistogramObserver):
    kwargs["bins"] = obs.bins
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return getattr(tobs, type(obs).__name__)(**kwargs)


@st.composite
def uniform_config(draw, cls, *, histogram: bool = False):
  per_channel = issubclass(cls, jo.PerChannelMinMaxObserver)
  qschemes = [q for q in jo.QScheme if q.is_per_channel == per_channel]
  dtypes = [jnp.uint8, jnp.int8, jnp.int32] if histogram else list(TORCH_DTYPE)
  kw = {
    "dtype": draw(st.sampled_from(dtypes)),
    "qscheme": draw(st.sampled_from(qschemes)),
    "reduce_range": draw(st.booleans()),
    "eps": draw(st.sampled_from([jo.FLOAT32_EPS, 2.0**-12, 1e-3, 0.0])),
  }
  if draw(st.booleans()):
    lo, hi = jo.calculate_qmin_qmax(None, None, False, np.dtype(kw["dtype"]), False)
    qmin = draw(st.integers(max(lo, -(2**20)), 0))
    qmax = draw(st.integers(1, min(hi, 2**20)))
    if np.dtype(kw["dtype"]) == np.int8:
      qmax = min(qmax, qmin + 255)
    kw.update(quant_min=qmin, quant_max=qmax)
  if "averaging_constant" in cls.__dataclass_fields__:
    c = st.one_of(st.sampled_from([0.0, 0.01, 0.5, 1.0]), st.floats(0, 1, width=32))
    kw["averaging_constant"] = draw(c)
  if per_channel:
    kw["ch_axis"] = draw(st.sampled_from([0, 1, -1]))
  if histogram:
    kw["bins"] = draw(st.sampled_from([8, 16, 64, 128]))
  uint8_rr_sym = kw["reduce_range"] and kw["qscheme"].is_symmetric and kw["dtype"] == jnp.uint8
  assume(not (uint8_rr_sym and "quant_min" not in kw))  # a documented deviation
  return cls(**kw)


def torch_qparams(t):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    scale, zero_point = t.calculate_qparams()
  return scale.numpy(), zero_point.numpy()


def compare_observer(obs, batches):
  t = torch_observer(obs)
  state = obs.init(jnp.asarray(batches[0]))
  for b in batches:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      t(torch.from_numpy(flush(b)))
    state = obs.update(state, jnp.asarray(b))
  # A subnormal that only moves (a one-element min) is kept, arithmetic flushes it (also a
  # subnormal intermediate result): documented as read as zero, so near-zero states are zeroed.
  assert_same(near_zero(state.min_val), near_zero(t.min_val.numpy()), f"{obs} min_val")
  assert_same(near_zero(state.max_val), near_zero(t.max_val.numpy()), f"{obs} max_val")
  t_scale, t_zp = torch_qparams(t)
  assume(not np.any((t_scale != 0) & (np.abs(t_scale) < TINY)))  # documented: flushed scale
  scale, zero_point = obs.calculate_qparams(state)
  assert_same(scale, t_scale, f"{obs} scale")
  if t_zp.dtype.kind == "f":  # float qparams: -min_val / scale can be a subnormal result
    zero_point, t_zp = flush(zero_point), flush(t_zp)
  assert_same(zero_point, t_zp, f"{obs} zero_point")
  return state


BATCHES = st.integers(1, 3)


@budget(30)
@given(obs=uniform_config(jo.MinMaxObserver), data=st.data())
@counted
def test_minmax_observer(obs, data):
  batches = [data.draw(values(8)) for _ in range(data.draw(BATCHES))]
  compare_observer(obs, batches)


@budget(30)
@given(obs=uniform_config(jo.MovingAverageMinMaxObserver), data=st.data())
@counted
def test_moving_average_minmax_observer(obs, data):
  batches = [data.draw(values(8)) for _ in range(data.draw(BATCHES))]
  # Documented rule for degenerate states: where torch's rounding inverts the range, the batch
  # range is kept instead (torch then asserts); only torch-valid sequences are compared.
  assume(_torch_range_stays_valid(obs, batches))
  compare_observer(obs, batches)


def _torch_range_stays_valid(obs, batches) -> bool:
  t = torch_observer(obs)
  for b in batches:
    t(torch.from_numpy(flush(b)))
    lo, hi = t.min_val.numpy(), t.max_val.numpy()
    fresh = (lo == np.inf) & (hi == -np.inf)
    if np.any(~(lo <= hi) & ~fresh):
      return False
  return True


@st.composite
def channel_batches(draw, obs):
  rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  n = draw(BATCHES)
  return [draw(values(rows * cols)).reshape(rows, cols) for _ in range(n)]


@budget(25)
@given(obs=uniform_config(jo.PerChannelMinMaxObserver), data=st.data())
@counted
def test_per_channel_minmax_observer(obs, data):
  obs = obs.replace(ch_axis=obs.ch_axis % 2)  # torch needs 0 <= ch_axis
  compare_observer(obs, data.draw(channel_batches(obs)))


@budget(25)
@given(obs=uniform_config(jo.MovingAveragePerChannelMinMaxObserver), data=st.data())
@counted
def test_moving_average_per_channel_minmax_observer(obs, data):
  obs = obs.replace(ch_axis=obs.ch_axis % 2)
  batches = data.draw(channel_batches(obs))
  assume(_torch_range_stays_valid(obs, batches))
  compare_observer(obs, batches)


@budget(8)
@given(obs=uniform_config(jo.HistogramObserver, histogram=True), data=st.data())
@counted
def test_histogram_observer(obs, data):
  assume(obs.qscheme in (jo.per_tensor_affine, jo.per_tensor_symmetric))
  batches = [data.draw(values(16, huge=False)) for _ in range(data.draw(BATCHES))]
  t = torch_observer(obs)
  state = obs.init(jnp.asarray(batches[0]))
  for b in batches:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      t(torch.from_numpy(flush(b)))
    state = obs.update(state, jnp.asarray(b))
  assert_same(flush(state.min_val), flush(t.min_val.numpy()), f"{obs} min_val")
  assert_same(flush(state.max_val), flush(t.max_val.numpy()), f"{obs} max_val")
  assert_same(state.histogram, t.histogram.numpy(), f"{obs} histogram")
  t_scale, t_zp = torch_qparams(t)
  assume(not np.any((t_scale != 0) & (np.abs(t_scale) < TINY)))
  scale, zero_point = obs.calculate_qparams(state)
  assert_same(scale, t_scale, f"{obs} scale")
  assert_same(zero_point, t_zp, f"{obs} zero_point")


# FakeQuantize: observer updates, fake quant and the straight-through gradient per step.
@st.composite
def fake_quantize_config(draw):
  cls = draw(
    st.sampled_from(
      [jo.MovingAverageMinMaxObserver, jo.MinMaxObserver, jo.PerChannelMinMaxObserver]
    )
  )
  per_channel = issubclass(cls, jo.PerChannelMinMaxObserver)
  qschemes = [q for q in jo.QScheme if q.is_per_channel == per_channel]
  kw = {
    "dtype": draw(st.sampled_from([jnp.uint8, jnp.int8])),
    "qscheme": draw(st.sampled_from(qschemes)),
    "eps": draw(st.sampled_from([jo.FLOAT32_EPS, 2.0**-12])),
  }
  if kw["qscheme"] == jo.per_channel_affine_float_qparams:
    kw["dtype"] = jnp.uint8
  if "averaging_constant" in cls.__dataclass_fields__:
    kw["averaging_constant"] = draw(st.sampled_from([0.01, 0.5, 1.0]))
  if per_channel:
    kw["ch_axis"] = draw(st.sampled_from([0, 1]))
  info = jnp.iinfo(kw["dtype"])
  lo = draw(st.integers(int(info.min), 0))
  hi = draw(st.integers(1, min(int(info.max), lo + 255)))
  return jo.FakeQuantize(observer=cls.with_args(**kw), quant_min=lo, quant_max=hi)


def torch_fake_quantize(fq):
  obs = fq.activation_post_process
  kwargs = {"dtype": TORCH_DTYPE[obs.dtype], "qscheme": TORCH_QSCHEME[obs.qscheme], "eps": obs.eps}
  for name in ("averaging_constant", "ch_axis"):
    if hasattr(obs, name):
      kwargs[name] = getattr(obs, name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cls = getattr(tobs, type(obs).__name__)
    return tfq.FakeQuantize(cls, fq.quant_min, fq.quant_max, **kwargs)


def bits(a) -> np.ndarray:
  a = np.array(a, np.float32)
  a[np.isnan(a)] = np.nan
  return a.view(np.uint32)


@jax.jit
def _fq_step(fq, state, x, dy):
  y, pullback, new_state = jax.vjp(lambda a: fq.apply(state, a), x, has_aux=True)
  return y, new_state, pullback(dy)[0]


@budget(15)
@given(fq=fake_quantize_config(), data=st.data())
@counted
def test_fake_quantize(fq, data):
  module = torch_fake_quantize(fq)
  state = fq.init(np.zeros((3, 4), np.float32))
  for _ in range(data.draw(st.integers(1, 3))):
    x = data.draw(values(12, huge=False)).reshape(3, 4)
    dy = data.draw(values(12, huge=False)).reshape(3, 4)
    y, state, dx = _fq_step(fq, state, x, dy)
    xt = torch.from_numpy(flush(x)).requires_grad_()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ty = module(xt)
    ty.backward(torch.from_numpy(flush(dy)))
    t_scale = module.scale.numpy()
    assume(not np.any((t_scale != 0) & (np.abs(t_scale) < TINY)))
    np.testing.assert_array_equal(bits(state.scale).reshape(-1), bits(t_scale), err_msg=str(fq))
    np.testing.assert_array_equal(
      np.asarray(state.zero_point).reshape(-1), module.zero_point.numpy(), err_msg=str(fq)
    )
    np.testing.assert_array_equal(bits(flush(y)), bits(flush(ty.detach().numpy())), str(fq))
    np.testing.assert_array_equal(bits(flush(dx)), bits(flush(xt.grad.numpy())), str(fq))


# The two fake-quant ops: values and straight-through gradients, reverse and forward mode.
@st.composite
def op_case(draw, per_channel: bool):
  qmin = draw(st.integers(-(2**15), 0))
  qmax = draw(st.integers(max(qmin, 1), min(qmin + 2**16, 2**15)))
  rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 5))
  axis = draw(st.sampled_from([0, 1])) if per_channel else None
  n = (rows, cols)[axis] if per_channel else 1
  scale = st.one_of(
    st.floats(2.0**-20, 1024.0, width=32), st.sampled_from([1e-30, 0.1, 0.5, 1.0, 2.0**-10, 3.0])
  )
  scales = np.array(draw(st.lists(scale, min_size=n, max_size=n)), np.float32)
  zps = np.array(draw(st.lists(st.integers(qmin, qmax), min_size=n, max_size=n)), np.int32)
  x = draw(values(rows * cols)).reshape(rows, cols)
  # Ties of the grid itself: x = (k + 1/2) * scale, the round-half-even cases.
  if draw(st.booleans()):
    k = np.array(draw(st.lists(st.integers(-40, 40), min_size=rows * cols, max_size=rows * cols)))
    s = scales.reshape((-1, 1) if axis == 0 else (1, -1)) if per_channel else scales[0]
    x = ((k.reshape(rows, cols) + 0.5) * s).astype(np.float32)
  dy = draw(values(rows * cols, huge=False)).reshape(rows, cols)
  return x, scales, zps, axis, qmin, qmax, dy


def _check_op(ours, theirs, x, dy, args, deviation=None):
  """Values, reverse- and forward-mode gradients; ``deviation`` masks documented value rows."""
  jx, jdy = jnp.asarray(x), jnp.asarray(dy)
  y, pullback = jax.vjp(ours, jx)
  (dx,) = pullback(jdy)
  xt = torch.from_numpy(flush(x)).requires_grad_()
  ty = theirs(xt)
  ty.backward(torch.from_numpy(flush(dy)))
  keep = np.ones(x.shape, bool) if deviation is None else ~deviation
  ours_y, theirs_y = bits(flush(y))[keep], bits(flush(ty.detach().numpy()))[keep]
  np.testing.assert_array_equal(ours_y, theirs_y, str(args))
  np.testing.assert_array_equal(bits(flush(dx)), bits(flush(xt.grad.numpy())), str(args))
  # Forward mode: the JVP along dy is the elementwise straight-through derivative.
  y_fwd, y_dot = jax.jvp(ours, (jx,), (jdy,))
  np.testing.assert_array_equal(bits(y_fwd), bits(y))
  np.testing.assert_array_equal(bits(y_dot), bits(dx))


@budget(25)
@given(case=op_case(per_channel=False))
@counted
def test_fake_quantize_per_tensor_affine_op(case):
  x, scales, zps, _, qmin, qmax, dy = case
  s, z = float(scales[0]), int(zps[0])
  _check_op(
    lambda a: jo.fake_quantize_per_tensor_affine(a, s, z, qmin, qmax),
    lambda a: torch.fake_quantize_per_tensor_affine(a, s, z, qmin, qmax),
    x,
    dy,
    (s, z, qmin, qmax),
  )


@budget(25)
@given(case=op_case(per_channel=True))
@counted
def test_fake_quantize_per_channel_affine_op(case):
  x, scales, zps, axis, qmin, qmax, dy = case
  # Documented deviation: per channel, |x / s| >= 2**63 saturates to quant_max (torch's x86 int64
  # cast gives quant_min); the gradient mask is 0 either way, so gradients are compared everywhere.
  inv = np.float32(1) / scales.reshape((-1, 1) if axis == 0 else (1, -1))
  with np.errstate(over="ignore"):
    past_int64 = np.abs(flush(x) * inv) >= np.float32(2.0**63)
  _check_op(
    lambda a: jo.fake_quantize_per_channel_affine(a, scales, zps, axis, qmin, qmax),
    lambda a: torch.fake_quantize_per_channel_affine(
      a, torch.from_numpy(scales), torch.from_numpy(zps), axis, qmin, qmax
    ),
    x,
    dy,
    (scales, zps, axis, qmin, qmax),
    deviation=past_int64,
  )


def test_mismatch_report():
  """Last in the file: under the long profile, the counts per class, then the verdict."""
  if not _LONG:
    return
  report = {name: [MISMATCHES[name], EXAMPLES[name]] for name in sorted(EXAMPLES)}
  path = os.environ.get("HYPOTHESIS_REPORT")
  if path:
    with open(path, "w") as f:
      json.dump(report, f, indent=1)
  assert not +MISMATCHES, f"mismatches [count, examples] per test: {report}"
