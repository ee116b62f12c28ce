"""torch 2.13 as the test oracle: our configs mapped to torch observers, random configs and inputs."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo

torch = pytest.importorskip("torch")
from torch.ao.quantization import observer as tobs  # noqa: E402

TORCH_DTYPE = {
  np.dtype(jnp.uint8): torch.quint8,
  np.dtype(jnp.int8): torch.qint8,
  np.dtype(jnp.int32): torch.qint32,
  np.dtype(jnp.int16): torch.int16,
  np.dtype(jnp.uint16): torch.uint16,
  np.dtype(jnp.uint4): torch.quint4x2,
  np.dtype(jnp.float8_e4m3fn): torch.float8_e4m3fn,
  np.dtype(jnp.float8_e5m2): torch.float8_e5m2,
}
TORCH_QSCHEME = {q: getattr(torch, q.value) for q in jo.QScheme}

_CONFIG_FIELDS = ("qscheme", "reduce_range", "quant_min", "quant_max", "eps")


def torch_observer(obs):
  """The torch observer with the same config as ``obs``."""
  kwargs = {"dtype": TORCH_DTYPE[obs.dtype]}
  if obs.reduce_range and obs.qscheme.is_symmetric and obs.dtype == np.uint8:
    kwargs["dtype"] = torch.uint8  # torch refuses quint8 here; torch.uint8 has the same rules.
  for name in _CONFIG_FIELDS:
    value = getattr(obs, name)
    kwargs[name] = TORCH_QSCHEME[value] if name == "qscheme" else value
  for name in ("averaging_constant", "ch_axis"):
    if hasattr(obs, name):
      kwargs[name] = getattr(obs, name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return getattr(tobs, type(obs).__name__)(**kwargs)


def torch_run(obs, batches):
  """Feeds ``batches`` to the torch twin of ``obs``; returns (observer, scale, zero_point) as NumPy."""
  t = torch_observer(obs)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for b in batches:
      t(torch.from_numpy(np.array(b)))
    scale, zero_point = t.calculate_qparams()
  return t, scale.numpy(), zero_point.numpy()


def random_config(rng: np.random.Generator, cls, **fixed):
  """A random config of ``cls`` that torch accepts (quint8 symmetric reduce_range excluded)."""
  per_channel = issubclass(cls, jo.PerChannelMinMaxObserver)
  qschemes = [q for q in jo.QScheme if q.is_per_channel == per_channel]
  dtypes = list(TORCH_DTYPE)
  while True:
    kw = {
      "dtype": dtypes[rng.integers(len(dtypes))],
      "qscheme": qschemes[rng.integers(len(qschemes))],
      "reduce_range": bool(rng.random() < 0.3),
      "eps": [jo.FLOAT32_EPS, 2.0**-12, 1e-3, 0.0][rng.integers(4)],
    }
    if rng.random() < 0.3:
      lo, hi = jo.calculate_qmin_qmax(None, None, False, kw["dtype"], False)
      qmin = int(rng.integers(max(lo, -(2**20)), 1))
      qmax = int(rng.integers(1, min(hi, 2**20) + 1))
      if kw["dtype"] == np.int8:
        qmax = min(qmax, qmin + 255)
      kw.update(quant_min=qmin, quant_max=qmax)
    if "averaging_constant" in {f for f in cls.__dataclass_fields__}:
      kw["averaging_constant"] = float(rng.choice([0.01, 0.5, 1.0, float(rng.random())]))
    kw.update(fixed)
    uint8_rr_sym = kw["reduce_range"] and kw["qscheme"].is_symmetric and kw["dtype"] == np.uint8
    if uint8_rr_sym and "quant_min" not in kw:
      continue  # a documented deviation, tested on its own.
    return cls(**kw)


INPUT_KINDS = (
  "normal",
  "positive",
  "negative",
  "constant",
  "zeros",
  "ties",
  "tiny",
  "huge",
  "mixed_scale",
)


def random_batch(rng: np.random.Generator, kind: str, shape) -> np.ndarray:
  """One float32 batch of a named kind (ties sit exactly on half-integers of a power-of-2 grid)."""
  n = rng.standard_normal(shape)
  if kind == "normal":
    x = n * 10.0 ** rng.uniform(-3, 3)
  elif kind == "positive":
    x = np.abs(n) + rng.uniform(0, 5)
  elif kind == "negative":
    x = -np.abs(n) - rng.uniform(0, 5)
  elif kind == "constant":
    x = np.full(shape, rng.uniform(-10, 10))
  elif kind == "zeros":
    x = np.zeros(shape)
  elif kind == "ties":
    x = (rng.integers(-300, 300, shape) + 0.5) * 2.0 ** rng.integers(-8, 3)
  elif kind == "tiny":
    x = n * 1e-30
  elif kind == "huge":
    x = n * 1e30
  else:
    x = n * np.exp(rng.uniform(-20, 20, shape))
  return np.asarray(x, np.float32)


def assert_same(ours, theirs, what=""):
  """Bit-exact equality of float arrays (NaN == NaN), value equality for integers."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  if ours.size == theirs.size:
    ours = ours.reshape(theirs.shape)  # our per-tensor () against torch's [1]
  np.testing.assert_array_equal(ours, theirs, err_msg=what)
