"""with_args / with_callable_args against torch's _PartialWrapper, on random chains."""

import itertools
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME, torch

import jax_observers as jo

# (our value, torch value) pools per argument
POOL = {
  "dtype": [(jnp.int8, torch.qint8), (jnp.uint8, torch.quint8), (jnp.int32, torch.qint32)],
  "qscheme": [(q, TORCH_QSCHEME[q]) for q in (jo.per_tensor_affine, jo.per_tensor_symmetric)],
  "eps": [(e, e) for e in (1e-3, 2.0**-12, 0.5)],
  "averaging_constant": [(c, c) for c in (0.1, 0.5, 1.0)],
}


def _observed(obj, torch_side):
  dtype = obj.dtype
  qscheme = obj.qscheme
  if not torch_side:
    dtype = TORCH_DTYPE[dtype]
    qscheme = TORCH_QSCHEME[qscheme]
  eps = obj.eps.item() if torch_side else np.float32(obj.eps).item()
  return (dtype, qscheme, eps, obj.averaging_constant)


def test_random_chains_build_what_torch_builds():
  rng = np.random.default_rng(0)
  torch_cls = torch.ao.quantization.MovingAverageMinMaxObserver
  for _ in range(200):
    ours, theirs = jo.MovingAverageMinMaxObserver, torch_cls
    for _ in range(rng.integers(1, 5)):
      name = list(POOL)[rng.integers(len(POOL))]
      ours_v, torch_v = POOL[name][rng.integers(len(POOL[name]))]
      if rng.random() < 0.5:
        ours, theirs = ours.with_args(**{name: ours_v}), theirs.with_args(**{name: torch_v})
      else:
        ours = ours.with_callable_args(**{name: lambda v=ours_v: v})
        theirs = theirs.with_callable_args(**{name: lambda v=torch_v: v})
    call = {}
    if rng.random() < 0.3:
      call = {"eps": 0.25}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      expected = _observed(theirs(**call), torch_side=True)
    assert _observed(ours(**call), torch_side=False) == expected, repr(ours)


def test_callable_args_are_evaluated_at_every_construction():
  counter = itertools.count()
  make = jo.MovingAverageMinMaxObserver.with_callable_args(
    averaging_constant=lambda: 1.0 / (2 + next(counter))
  ).with_args(dtype=jnp.int8)
  first, second = make(), make()
  assert first.averaging_constant == 0.5 and second.averaging_constant == 1.0 / 3
  assert make(averaging_constant=0.75).averaging_constant == 0.75  # explicit keywords win
  assert next(counter) == 2  # the callable was not called for the explicit keyword


def test_later_with_args_override_earlier_and_call_keywords_override_all():
  make = jo.MinMaxObserver.with_args(dtype=jnp.int8, eps=0.5).with_args(dtype=jnp.uint8)
  assert make().dtype == np.uint8 and make().eps == 0.5
  assert make(dtype=jnp.int32).dtype == np.int32


def test_unknown_names_fail_at_with_args_time():
  with pytest.raises(TypeError, match="no argument 'bins'"):
    jo.MinMaxObserver.with_args(bins=10)
  with pytest.raises(TypeError, match="no argument 'nope'"):
    jo.MinMaxObserver.with_args(eps=0.1).with_callable_args(nope=lambda: 1)
  with pytest.raises(TypeError, match="callable"):
    jo.MinMaxObserver.with_callable_args(eps=0.1)


def test_partials_are_frozen_comparable_hashable_and_readable():
  a = jo.MinMaxObserver.with_args(dtype=jnp.int8).with_args(qscheme=jo.per_tensor_symmetric)
  b = jo.MinMaxObserver.with_args(dtype=jnp.int8).with_args(qscheme=jo.per_tensor_symmetric)
  assert a == b and hash(a) == hash(b)
  assert a.root is jo.MinMaxObserver
  assert a.resolved_keywords == {"dtype": jnp.int8, "qscheme": jo.per_tensor_symmetric}
  assert repr(a).startswith("MinMaxObserver.with_args(dtype=")
  assert "with_args(qscheme=<QScheme.PER_TENSOR_SYMMETRIC" in repr(a)
  with pytest.raises(AttributeError):
    a.keywords = ()
  assert a() == a() and a() is not a()
  assert {a(): 1}[b()] == 1  # configs hash by value


def test_configs_are_hashable_frozen_values():
  obs = jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8)
  assert obs == jo.PerChannelMinMaxObserver(ch_axis=1, dtype=np.int8)
  assert hash(obs) == hash(obs.replace())
  with pytest.raises(AttributeError):
    obs.ch_axis = 0
  with pytest.raises(TypeError):
    jo.MinMaxObserver(jnp.int8)  # keyword-only, as the design card asks
