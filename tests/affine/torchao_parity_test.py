"""jo's affine functions and observers against live torchao 0.18.0, on random configs.

Every case calls torchao itself (``torchao.quantization.quant_primitives``, its observers and the
pt2e copy) and compares bit for bit. Each jo configuration maps to the torchao 0.18 function that
computes it (``preserve_zero`` / ``zero_point_domain`` were split into separate functions); where
jo knowingly differs, the case is counted under a named deviation and the difference is pinned
(torchao's value is checked to be the documented one), so an unexplained difference still fails.
"""

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import random_batch
from torchao_oracle import torchao_granularity

import jax_observers as jo

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
from torchao.quantization import granularity as tg  # noqa: E402
from torchao.quantization import observer as tobs  # noqa: E402
from torchao.quantization import quant_primitives as tq  # noqa: E402
from torchao.quantization.pt2e import _affine_quantization as pt2e  # noqa: E402
from torchao.quantization.utils import get_block_size  # noqa: E402

ASYM, SYM, SNCE = (jo.MappingType.ASYMMETRIC, jo.MappingType.SYMMETRIC,
                   jo.MappingType.SYMMETRIC_NO_CLIPPING_ERR)  # fmt: skip
INT, FLOAT, NONE = jo.ZeroPointDomain.INT, jo.ZeroPointDomain.FLOAT, jo.ZeroPointDomain.NONE
KINDS = ("normal", "positive", "negative", "constant", "zeros", "ties", "tiny", "huge", "wide",
         "outliers")  # fmt: skip
SHAPES = ((8,), (4, 8), (2, 3, 8), (4, 256), (2, 2, 128), (3, 384))
JO_DTYPES = (jnp.int2, jnp.uint2, jnp.int4, jnp.uint4, jnp.int8, jnp.uint8,
             jnp.int16, jnp.int32)  # fmt: skip
TORCH_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)


def _bounds(dtype):
  info = jnp.iinfo(dtype)
  return int(info.min), int(info.max)


def _smallest(dtypes, qmin, qmax, bounds):
  return next(d for d in dtypes if bounds(d)[0] <= qmin and qmax <= bounds(d)[1])


def _torch_bounds(dtype):
  return int(torch.iinfo(dtype).min), int(torch.iinfo(dtype).max)


def same(ours, theirs) -> bool:
  """Bit equality of values (NaN == NaN; the sign of zero counts), shapes compared by size."""
  a = np.asarray(ours)
  b = theirs.float().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
  if a.size != b.size:
    return False
  a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
  nan = np.isnan(a)
  return bool(
    np.array_equal(nan, np.isnan(b))
    and np.array_equal(a[~nan], b[~nan])
    and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan]))
  )


def _flushed(t):
  """torch's values with subnormals flushed to zero, as XLA:CPU computes them."""
  b = t.float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)
  tiny = np.abs(b) < np.finfo(np.float32).smallest_normal
  return np.where(tiny, np.copysign(0.0, b), b)


def subnormal_only(ours, theirs) -> bool:
  """The difference is XLA:CPU's flush of subnormal results to zero (a README deviation)."""
  return not same(ours, theirs) and same(ours, _flushed(theirs))


FTZ = "deviation: subnormal result flushed to zero (XLA:CPU)"


def _outliers(rng, shape):
  x = rng.standard_normal(shape)
  x.flat[rng.integers(x.size, size=max(1, x.size // 50))] *= 10.0 ** rng.uniform(2, 4)
  return x.astype(np.float32)


def random_input(rng, kind, shape) -> np.ndarray:
  return _outliers(rng, shape) if kind == "outliers" else random_batch(rng, kind, shape)


def random_granularity(rng, shape):
  n, last = len(shape), shape[-1]
  kind = rng.integers(6)
  if kind == 0:
    return jo.PerTensor()
  if kind == 1:
    return jo.PerAxis(int(rng.integers(-n, n)))
  if kind == 2:
    sizes = [g for g in (32, 64, 128) if last % g == 0] or [
      d for d in (2, 4, last) if last % d == 0
    ]
    return jo.PerGroup(int(rng.choice(sizes)))
  if kind == 3:
    return jo.PerRow(int(rng.integers(-n, n)))
  if kind == 4:
    return jo.PerToken()
  if n == 1:
    return jo.PerBlock((int(rng.choice([2, 4])),))
  rows = [d for d in (1, 2, 4) if shape[-2] % d == 0]
  cols = [d for d in (2, 4, 32, 128) if last % d == 0]
  return jo.PerBlock((int(rng.choice(rows)), int(rng.choice(cols))))


def random_range(rng):
  """(jo dtype, quant_min, quant_max, torch dtype): a dtype's range, a b-bit one (1 <= b <= 16)
  set by quant_min/quant_max, a random sub-range, or a degenerate quant_min == quant_max."""
  kind = rng.integers(10)
  if kind < 3:  # 1-bit dtypes: XLA cannot convert to them; 1-bit ranges come from quant_min/max
    dtype = JO_DTYPES[rng.integers(len(JO_DTYPES) - (0 if kind == 0 else 1))]
    qmin, qmax = _bounds(dtype)
    custom = False
  elif kind < 8:
    bits = int(rng.integers(1, 17))
    signed = bool(rng.random() < 0.5)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    custom = True
  else:
    lo = int(rng.integers(-200, 100))
    qmin, qmax = (lo, lo) if kind == 9 else (lo, lo + int(rng.integers(1, 300)))
    custom = True
  if custom:
    dtype = _smallest(JO_DTYPES, qmin, qmax, _bounds)
  tdtype = _smallest(TORCH_DTYPES, qmin, qmax, _torch_bounds)
  return dtype, (qmin if custom else None), (qmax if custom else None), tdtype, (qmin, qmax)


def random_case(rng):
  shape = SHAPES[rng.integers(len(SHAPES))]
  mapping = (ASYM, SYM, SNCE)[rng.integers(3)]
  preserve_zero, domain = True, INT
  if mapping == ASYM:
    preserve_zero = bool(rng.random() < 0.6)
    domain = (INT, FLOAT, NONE)[rng.integers(3)]
  elif rng.random() < 0.25:
    domain = NONE
  dtype, qmin, qmax, tdtype, qrange = random_range(rng)
  return {
    "shape": shape,
    "granularity": random_granularity(rng, shape),
    "mapping": mapping,
    "preserve_zero": preserve_zero,
    "domain": domain,
    "dtype": dtype,
    "quant_min": qmin,
    "quant_max": qmax,
    "tdtype": tdtype,
    "qrange": qrange,
    "eps": [None, None, 2.0**-12, 1e-3, 1e-30, 0.0][rng.integers(6)],
    "kind": str(rng.choice(KINDS)),
    "bf16_input": bool(rng.random() < 0.3),
    "bf16_output": bool(rng.random() < 0.4),
  }


def torchao_choose(t, case, block):
  """The torchao 0.18 function for jo's (mapping, preserve_zero, zero_point_domain)."""
  mapping = getattr(tq.MappingType, case["mapping"].name)
  args = (mapping, block, case["tdtype"], *case["qrange"], case["eps"])
  if not case["preserve_zero"]:
    if case["domain"] == FLOAT:
      return tq._choose_qparams_affine_tinygemm(t, *args, zero_point_dtype=torch.float32)
    return tq._choose_qparams_affine_dont_preserve_zero(t, *args)
  if case["domain"] == FLOAT:  # no torchao 0.18 function: tinygemm on each block plus a zero
    view, dims = tq._get_reduction_params(list(block), t.shape)
    keep = [d for d in range(len(view)) if d not in dims]
    blocks = t.view(view).permute(*keep, *dims).reshape(-1, int(np.prod(block)))
    widened = torch.cat([blocks, torch.zeros_like(blocks[:, :1])], 1)
    return tq._choose_qparams_affine_tinygemm(
      widened, mapping, (1, widened.shape[1]), *args[2:], zero_point_dtype=torch.float32
    )
  return tq.choose_qparams_affine(t, *args)


def torchao_quantize(t, case, block, scale, zp):
  fn = {INT: tq.quantize_affine, FLOAT: tq._quantize_affine_tinygemm}.get(
    case["domain"], tq._quantize_affine_no_zero_point
  )
  return fn(t, block, scale, zp, case["tdtype"], *case["qrange"])


def torchao_dequantize(q, case, block, scale, zp, out):
  fn = {INT: tq.dequantize_affine, FLOAT: tq._dequantize_affine_tinygemm}.get(
    case["domain"], tq._dequantize_affine_no_zero_point
  )
  return fn(q, block, scale, zp, case["tdtype"], *case["qrange"], output_dtype=out)


def _jo_args(case):
  return (case["dtype"], case["quant_min"], case["quant_max"])


def check_case(rng, case, counts) -> list[str]:
  """Compare one case; count it; return the unexplained differences."""
  shape, g = case["shape"], case["granularity"]
  block = tuple(get_block_size(shape, torchao_granularity(g)))
  assert jo.get_block_size(shape, g) == block, (shape, g)
  x = random_input(rng, case["kind"], shape)
  t = torch.from_numpy(x)
  if case["bf16_input"]:
    t = t.to(torch.bfloat16)
    x = t.float().numpy()
  xj = jnp.asarray(x).astype(jnp.bfloat16 if case["bf16_input"] else jnp.float32)
  qp = jo.choose_qparams_affine(
    xj, case["mapping"], g, *_jo_args(case), case["eps"], case["preserve_zero"], case["domain"]
  )
  problems = []
  all_ones = not tq._get_reduction_params(list(block), shape)[1]
  if all_ones:  # torchao reduces over dim=[], i.e. the whole tensor; jo: one block per element
    scale, _ = torchao_choose(t.float(), case, block)
    whole = jo.choose_qparams_affine(
      xj, case["mapping"], jo.PerTensor(), *_jo_args(case), case["eps"], case["preserve_zero"],
      case["domain"],
    )  # fmt: skip
    pair = torch.stack([t.float(), t.float()], -1)  # each element its own block of two copies
    per_element, _ = torchao_choose(pair, case, (*block, 2))
    ok = scale.ndim == 0 and same(whole.scale, scale) and same(qp.scale, per_element)
    counts["deviation: all-ones block (torchao collapses the tensor)"] += 1
    return [] if ok else [f"all-ones pin failed: {case}"]
  scale, zp = torchao_choose(t.float(), case, block)
  ok_scale = same(qp.scale, scale)
  ok_zp = case["domain"] == NONE or same(qp.zero_point, zp)
  if case["domain"] == NONE:
    ok_zp = not np.any(np.asarray(qp.zero_point))
  if not ok_scale and subnormal_only(qp.scale, scale):
    counts[FTZ] += 1
    return problems
  if not (ok_scale and ok_zp):
    problems.append(f"choose: {case}: jo {qp} torchao {scale}, {zp}")
  if case["bf16_input"] and case["preserve_zero"] and case["domain"] == INT:
    native, _ = torchao_choose(t, case, block)  # torchao computes in bfloat16
    counts["bf16 input: torchao's bfloat16 qparams also compared"] += 1
    a, b = native.float().numpy().reshape(-1), np.asarray(qp.scale).reshape(-1)
    fin = np.isfinite(a) & np.isfinite(b)
    if not np.all(np.abs(a[fin] - b[fin]) <= 2.0**-7 * np.abs(b[fin])):
      problems.append(f"bf16 torchao scale beyond 1 bf16 ulp: {case}")
  # quantize / dequantize with jo's qparams, handed to both
  s_np = np.asarray(qp.scale)
  if not np.all(np.isfinite(s_np) & (s_np > 0)) and not np.all(np.isinf(s_np)):
    counts["quantize skipped: scale 0 or NaN (codes undefined in torchao)"] += 1
    return problems
  ts = torch.from_numpy(np.array(s_np, np.float32))
  tz = None if case["domain"] == NONE else torch.from_numpy(np.array(qp.zero_point))
  domain = case["domain"]
  q = jo.quantize_affine(xj, g, qp.scale, qp.zero_point, *_jo_args(case), domain)
  tcodes = torchao_quantize(t, case, block, ts, tz)
  codes = np.asarray(q).astype(np.int64).reshape(-1)
  theirs = tcodes.numpy().astype(np.int64).reshape(-1)
  if not np.array_equal(codes, theirs):
    wrap = (theirs == -(2**31)) & (codes == 2**31 - 1)
    if case["tdtype"] == torch.int32 and np.array_equal(codes[~wrap], theirs[~wrap]):
      counts["deviation: int32 top clamp (torchao wraps to INT_MIN)"] += 1
      tcodes = torch.from_numpy(codes.reshape(shape).astype(np.int32))
    else:
      problems.append(f"quantize: {case}")
      return problems
  out_j, out_t = (jnp.bfloat16, torch.bfloat16) if case["bf16_output"] else (jnp.float32,) * 2
  out_t = torch.bfloat16 if case["bf16_output"] else torch.float32
  deq = jo.dequantize_affine(
    q, g, qp.scale, qp.zero_point, *_jo_args(case), domain, output_dtype=out_j
  )
  tdeq = torchao_dequantize(tcodes, case, block, ts, tz, out_t)
  if deq.dtype == out_j and subnormal_only(deq, tdeq):
    counts[FTZ] += 1
    return problems
  if deq.dtype != out_j or not same(deq, tdeq):
    problems.append(f"dequantize: {case}")
  if not problems:
    counts["bit-equal"] += 1
  return problems


REPORT = {}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_functions_match_torchao_on_random_configs(seed):
  """choose/quantize/dequantize_affine: ~100 random configs per seed against torchao 0.18."""
  rng = np.random.default_rng(100 + seed)
  counts, problems = collections.Counter(), []
  for _ in range(100):
    case = random_case(rng)
    counts["cases"] += 1
    problems += check_case(rng, case, counts)
  REPORT[f"functions seed {seed}"] = dict(counts)
  print(dict(counts))
  assert not problems, "\n".join(problems[:5])
  assert counts["bit-equal"] >= 0.8 * counts["cases"]


def _stacked(lo, hi):
  return torch.stack([torch.from_numpy(np.array(lo)).reshape(-1),
                      torch.from_numpy(np.array(hi)).reshape(-1)], -1)  # fmt: skip


def torchao_observer(case, cls_name):
  kw = {
    "quant_min": case["qrange"][0],
    "quant_max": case["qrange"][1],
    "eps": case["eps"],
    "preserve_zero": case["preserve_zero"],
    "zero_point_domain": getattr(tq.ZeroPointDomain, case["domain"].name),
  }
  mapping = getattr(tq.MappingType, case["mapping"].name)
  gran = torchao_granularity(case["granularity"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # preserve_zero=False, non-INT domains
    if cls_name == "minmax":
      return tobs.AffineQuantizedMinMaxObserver(mapping, case["tdtype"], gran, **kw)
    return pt2e.AffineQuantizedMovingAverageMinMaxObserver(
      mapping, case["tdtype"], gran, averaging_constant=case["c"], **kw
    )


@pytest.mark.parametrize("cls_name", ["minmax", "moving_average"])
def test_observers_match_torchao(cls_name):
  """State live against torchao's observer; qparams against the observer where torchao computes
  jo's configuration, else against the split function on the state (pinned deviation)."""
  rng = np.random.default_rng(7 if cls_name == "minmax" else 8)
  cls = (
    jo.AffineQuantizedMinMaxObserver
    if cls_name == "minmax"
    else jo.AffineQuantizedMovingAverageMinMaxObserver
  )
  counts, problems = collections.Counter(), []
  for _ in range(40):
    case = random_case(rng)
    shape = case["shape"]
    block = tuple(get_block_size(shape, torchao_granularity(case["granularity"])))
    if not tq._get_reduction_params(list(block), shape)[1]:
      continue  # the all-ones deviation is pinned in the function test
    kw = {"averaging_constant": float(rng.choice([0.01, 0.5, 1.0]))} if cls_name != "minmax" else {}
    case["c"] = kw.get("averaging_constant")
    obs = cls(
      mapping_type=case["mapping"],
      target_dtype=case["dtype"],
      granularity=case["granularity"],
      quant_min=case["quant_min"],
      quant_max=case["quant_max"],
      eps=case["eps"],
      preserve_zero=case["preserve_zero"],
      zero_point_domain=case["domain"],
      token_axes=0,
      **kw,
    )
    twin = torchao_observer(case, cls_name)
    batches = [random_input(rng, str(rng.choice(KINDS)), shape) for _ in range(rng.integers(1, 4))]
    state = obs.init(batches[0])
    for b in batches:
      state = obs.update(state, b)
      twin(torch.from_numpy(b))
    counts["cases"] += 1
    if not (same(state.min_val, twin.min_val) and same(state.max_val, twin.max_val)):
      problems.append(f"state: {case}")
      continue
    qp = obs.calculate_qparams(state)
    pz, domain = case["preserve_zero"], case["domain"]
    if cls_name == "minmax":  # torchao 0.18's observer: zero kept, zero point dropped for NONE
      torchao_has_it = pz and domain != FLOAT
    else:  # pt2e keeps the old arguments: preserve_zero=False needs FLOAT, symmetric needs INT
      torchao_has_it = (pz and domain == INT) or (not pz and domain == FLOAT)
      torchao_has_it |= pz and domain == NONE and case["mapping"] == ASYM
    if torchao_has_it:
      scale, zp = twin.calculate_qparams()
    else:  # pinned: torchao's observer computes another configuration; the split function is jo's
      eps = obs.default_eps if case["eps"] is None else case["eps"]
      scale, zp = torchao_choose(_stacked(state.min_val, state.max_val), {**case, "eps": eps},
                                 (1, 2))  # fmt: skip
      counts["deviation: torchao's observer ignores preserve_zero=False / FLOAT"] += 1
    ok = same(qp.scale, scale) and (
      same(qp.zero_point, zp) if case["domain"] != NONE else not np.any(np.asarray(qp.zero_point))
    )
    if not ok:
      problems.append(f"qparams: {case}: jo {qp} torchao {scale} {zp}")
    elif torchao_has_it:
      counts["bit-equal with torchao's observer"] += 1
  REPORT[f"observer {cls_name}"] = dict(counts)
  print(dict(counts))
  assert not problems, "\n".join(problems[:5])


def test_default_eps_is_torchaos_smallest_normal():
  x = np.zeros((2, 4), np.float32)
  qp = jo.choose_qparams_affine(x, SYM, jo.PerTensor(), jnp.int8)
  scale, _ = tq.choose_qparams_affine(torch.from_numpy(x), tq.MappingType.SYMMETRIC, (2, 4),
                                      torch.int8)  # fmt: skip
  assert float(qp.scale) == float(scale) == np.finfo(np.float32).smallest_normal
  # float16 inputs: torchao's eps is float16's smallest normal
  qp16 = jo.choose_qparams_affine(jnp.zeros((2, 4), jnp.float16), SYM, jo.PerTensor(), jnp.int8)
  s16, _ = tq.choose_qparams_affine(torch.zeros(2, 4, dtype=torch.float16),
                                    tq.MappingType.SYMMETRIC, (2, 4), torch.int8)  # fmt: skip
  assert float(qp16.scale) == float(s16) == float(np.finfo(np.float16).smallest_normal)
  # the pt2e moving-average observer (the only one torchao 0.18 has) still uses finfo.eps
  obs = jo.AffineQuantizedMovingAverageMinMaxObserver(
    mapping_type=SYM, target_dtype=jnp.int8, granularity=jo.PerTensor()
  )
  twin = pt2e.AffineQuantizedMovingAverageMinMaxObserver(
    tq.MappingType.SYMMETRIC, torch.int8, tg.PerTensor()
  )
  twin(torch.from_numpy(x))
  assert float(obs.calculate_qparams(obs.update(obs.init(x), x)).scale) == float(
    twin.calculate_qparams()[0]
  )


def test_bf16_dequantize_rounds_like_torchao():
  """The issue's example: tinygemm codes [7, 0, 15, 6] to bfloat16, and every domain."""
  q = np.array([[7, 0, 15, 6]], np.uint8)
  scale, zp = np.array([[0.3]], np.float32), np.array([[0.1]], np.float32)
  for domain, fn in ((FLOAT, tq._dequantize_affine_tinygemm), (INT, tq.dequantize_affine),
                     (NONE, tq._dequantize_affine_no_zero_point)):  # fmt: skip
    z = {FLOAT: zp, INT: np.array([[5]], np.int32), NONE: None}[domain]
    ours = jo.dequantize_affine(
      jnp.asarray(q, jnp.uint4), (1, 4), scale, np.zeros((1, 1)) if z is None else z, jnp.uint4,
      zero_point_domain=domain, output_dtype=jnp.bfloat16,
    )  # fmt: skip
    theirs = fn(torch.from_numpy(q), (1, 4), torch.from_numpy(scale),
                None if z is None else torch.from_numpy(z), torch.uint8, 0, 15,
                output_dtype=torch.bfloat16)  # fmt: skip
    assert ours.dtype == jnp.bfloat16 and same(ours, theirs), domain


def test_int32_codes_do_not_wrap_and_torchaos_top_clamp_is_pinned():
  # dequantize: jo subtracts in float32 as torchao does, never in int32
  q = np.array([2147483000, -5], np.int32)
  z = np.array([-1000, 3], np.int32)
  ours = jo.dequantize_affine(q, (1,), np.ones(2, np.float32), z, jnp.int32)
  theirs = tq.dequantize_affine(torch.from_numpy(q), (1,), torch.ones(2), torch.from_numpy(z),
                                torch.int32)  # fmt: skip
  assert same(ours, theirs) and float(ours[0]) > 2**31  # an int32 q - z would wrap below 0
  # quantize to int32: torchao's clamp bound 2**31 - 1 is 2**31 in float32 and wraps to INT_MIN
  x = np.array([3e9, -3e9, 5.0], np.float32)
  ours = jo.quantize_affine(x, (3,), np.float32(1.0), np.int32(0), jnp.int32)
  zero = torch.zeros((), dtype=torch.int32)
  theirs = tq.quantize_affine(torch.from_numpy(x), (3,), torch.ones(()), zero, torch.int32)
  assert np.asarray(ours).tolist() == [2**31 - 1, -(2**31), 5]
  assert theirs.tolist() == [-(2**31), -(2**31), 5]  # the deviation jo keeps (saturation)


def test_degenerate_range_gives_torchaos_inf_scale():
  x = np.array([[-1.0, 2.0, 0.5, 3.0]], np.float32)
  for mapping in (ASYM, SYM, SNCE):
    qp = jo.choose_qparams_affine(x, mapping, jo.PerTensor(), jnp.int8, 3, 3)
    scale, zp = tq.choose_qparams_affine(torch.from_numpy(x), getattr(tq.MappingType, mapping.name),
                                         (1, 4), torch.int8, 3, 3)  # fmt: skip
    assert same(qp.scale, scale) and same(qp.zero_point, zp), mapping
  assert np.all(np.isinf(jo.choose_qparams_affine(x, ASYM, jo.PerTensor(), jnp.int8, 3, 3).scale))


def test_bf16_inputs_are_computed_in_float32():
  """Pinned deviation: torchao computes bf16 qparams in bfloat16; jo equals torchao on x.float()."""
  rng = np.random.default_rng(11)
  t = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32) * 3).to(torch.bfloat16)
  xj = jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
  qp = jo.choose_qparams_affine(xj, ASYM, jo.PerGroup(32), jnp.uint4)
  native, _ = tq.choose_qparams_affine(t, tq.MappingType.ASYMMETRIC, (1, 32), torch.uint8, 0, 15)
  as_f32, _ = tq.choose_qparams_affine(t.float(), tq.MappingType.ASYMMETRIC, (1, 32), torch.uint8,
                                       0, 15)  # fmt: skip
  assert native.dtype == torch.bfloat16 and same(qp.scale, as_f32)
  assert not same(qp.scale, native)  # the deviation: torchao's bfloat16 roundings
  # quantize with a bfloat16 scale: torchao computes x * (1 / s) in bfloat16, jo in float32
  zp = torch.from_numpy(np.array(qp.zero_point))
  bf16_scale = native
  codes = tq.quantize_affine(t, (1, 32), bf16_scale, zp, torch.uint8, 0, 15).numpy()
  f32_codes = tq.quantize_affine(t, (1, 32), bf16_scale.float(), zp, torch.uint8, 0, 15).numpy()
  ours = jo.quantize_affine(xj, jo.PerGroup(32), jnp.asarray(bf16_scale.float().numpy()),
                            qp.zero_point, jnp.uint4)  # fmt: skip
  assert np.array_equal(np.asarray(ours).astype(np.uint8), f32_codes)
  assert not np.array_equal(f32_codes, codes)


def test_enums_and_block_sizes_are_torchaos():
  assert [(m.name, m.value) for m in jo.MappingType] == [
    (m.name, m.value) for m in tq.MappingType if m.name in jo.MappingType.__members__
  ]
  assert [d.name for d in jo.ZeroPointDomain] == [d.name for d in tq.ZeroPointDomain]
  for shape, g in (
    ((2, 256, 256), jo.PerBlock((128, 128))),
    ((4, 6, 8), jo.PerGroup(4)),
    ((4, 6, 8), jo.PerRow(1)),
    ((3, 5), jo.PerAxis(-1)),
    ((2, 3, 8), jo.PerToken()),
  ):
    assert jo.get_block_size(shape, g) == tuple(get_block_size(shape, torchao_granularity(g)))


def test_jit_group_wise_int4_weights_match_torchao():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-3, 3, (64, 1)))).astype(np.float32)
  for mapping in (ASYM, SYM, SNCE):
    for dtype, (qmin, qmax) in ((jnp.int4, (-8, 7)), (jnp.uint4, (0, 15))):
      fn = jax.jit(lambda w, m=mapping, d=dtype: jo.choose_qparams_affine(w, m, jo.PerGroup(32), d))
      qp = fn(w)
      tm = getattr(tq.MappingType, mapping.name)
      scale, zp = tq.choose_qparams_affine(torch.from_numpy(w), tm, (1, 32), torch.int8, qmin, qmax)
      assert same(qp.scale, scale) and same(qp.zero_point, zp), (mapping, dtype)
      q = jax.jit(jo.quantize_affine, static_argnums=(1, 4))(w, jo.PerGroup(32), *qp, dtype)
      tcodes = tq.quantize_affine(torch.from_numpy(w), (1, 32), scale, zp, torch.int8, qmin, qmax)
      assert np.array_equal(np.asarray(q).astype(np.int8), tcodes.numpy()), (mapping, dtype)


def test_padding_gives_torchaos_qparams_of_the_zero_padded_weight():
  """``pad=True``: a partial last group is torchao on the weight padded with zeros to 128 (ONNX
  Runtime / ModelOpt), while the partial group's own statistics see only its real elements."""
  rng = np.random.default_rng(4)
  w = rng.standard_normal((6, 200)).astype(np.float32)
  padded = torch.from_numpy(np.pad(w, ((0, 0), (0, 56))))
  for mapping in (ASYM, SYM, SNCE):
    obs = jo.AffineQuantizedMinMaxObserver(
      mapping_type=mapping, target_dtype=jnp.int4, granularity=jo.PerGroup(128),
      pad_partial_blocks=True,
    )  # fmt: skip
    qp = obs.calculate_qparams(obs.update(obs.init(w), w))
    tm = getattr(tq.MappingType, mapping.name)
    scale, zp = tq.choose_qparams_affine(padded, tm, (1, 128), torch.int8, -8, 7)
    assert same(qp.scale, scale) and same(qp.zero_point, zp), mapping
    codes = tq.quantize_affine(padded, (1, 128), scale, zp, torch.int8, -8, 7)
    assert np.array_equal(np.asarray(obs.quantize(w, qp)).astype(np.int8), codes.numpy()[:, :200])
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=ASYM, target_dtype=jnp.uint8, granularity=jo.PerGroup(128), preserve_zero=False,
    zero_point_domain=FLOAT, pad_partial_blocks=True,
  )  # fmt: skip
  shifted = w + 100
  state = obs.update(obs.init(shifted), shifted)
  assert np.array_equal(np.asarray(state.min_val[:, 1]), shifted[:, 128:].min(axis=1))


def test_choose_qparams_affine_with_min_max_matches_torchao():
  """torchao 0.18's ``choose_qparams_affine_with_min_max`` on random ranges (zero kept, INT)."""
  rng = np.random.default_rng(12)
  counts = collections.Counter()
  for _ in range(30):
    case = random_case(rng)
    lo = random_input(rng, case["kind"], (16,))
    hi = lo + np.abs(random_input(rng, case["kind"], (16,)))
    mapping = getattr(tq.MappingType, case["mapping"].name)
    scale, zp = tq.choose_qparams_affine_with_min_max(
      torch.from_numpy(lo), torch.from_numpy(hi), mapping, [], case["tdtype"], *case["qrange"],
      case["eps"],
    )  # fmt: skip
    qp = jo.choose_qparams_affine_with_min_max(
      lo, hi, case["mapping"], *_jo_args(case), case["eps"]
    )
    counts["cases"] += 1
    if same(qp.scale, scale) and same(qp.zero_point, zp):
      counts["bit-equal"] += 1
    else:
      assert subnormal_only(qp.scale, scale), case
      counts[FTZ] += 1
  REPORT["choose_qparams_affine_with_min_max"] = dict(counts)
  print(dict(counts))
  assert counts["bit-equal"] >= counts["cases"] - 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_mse_picks_torchaos_mse_observer_candidate(seed):
  """torchao's ``AffineQuantizedMSEObserver`` (data MSE, one batch, steps=100) and jo's histogram
  MSE (in-bin integrals, 2048 bins) pick the same candidate t = k/100 here. Tolerance: the scale
  may differ by torchao's ``range / steps * k`` against jo's ``range * (k / steps)`` roundings,
  two float32 ulps; a different candidate would be 1% of the range away."""
  rng = np.random.default_rng(seed)
  x = rng.laplace(0, 1, 60000) if seed != 1 else rng.standard_normal(60000)
  x = np.concatenate([x, rng.uniform(-30, 40, 10 * seed)]).astype(np.float32)
  twin = tobs.AffineQuantizedMSEObserver(
    tq.MappingType.SYMMETRIC, torch.int8, tg.PerTensor(), quant_min=-128, quant_max=127, steps=100
  )
  twin(torch.from_numpy(x))
  scale, _ = twin.calculate_qparams()
  obs = jo.HistogramMSEObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric, steps=100)
  ours = float(obs.calculate_qparams(obs.update(obs.init(x), x)).scale)
  assert abs(ours - float(scale)) <= 2 * np.spacing(np.float32(scale)), (ours, float(scale))
