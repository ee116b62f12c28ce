"""Eager calls against explicitly jitted ones: what a notebook user pays per call.

For each config and public method, on a 256x1024 float32 input: the median time of the eager call
(``obs.update(state, x)``, which dispatches to a cached compile) against ``jax.jit(obs.update)`` (the
row's floor), and how many compiles the repeated eager calls triggered (counted with
``jax.monitoring``; 0 is the target). The bar: eager <= 2x jit + 0.5 ms.
Run: ``python benchmarks/eager_bench.py``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

try:
  from benchmarks import common
except ImportError:  # run as a script
  import common

import jax_observers as jo

COMPILES = [0]


def _count(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)

CONFIGS = [
  ("MinMaxObserver", jo.MinMaxObserver()),
  ("MovingAverageMinMaxObserver", jo.MovingAverageMinMaxObserver()),
  ("PerChannelMinMaxObserver", jo.PerChannelMinMaxObserver(ch_axis=1)),
  ("HistogramObserver", jo.HistogramObserver()),
  ("HistogramPercentileObserver", jo.HistogramPercentileObserver()),
  ("HistogramMSEObserver", jo.HistogramMSEObserver()),
  ("Float8Observer", jo.Float8Observer()),
  ("FakeQuantize", jo.default_fake_quant()),
  ("FusedMovingAvgObsFakeQuantize", jo.default_fused_act_fake_quant(use_kernel_params=True)),
  ("LearnableFakeQuantize", jo.LearnableFakeQuantize(quant_min=0, quant_max=255)),
]


def methods(obs, x):
  state = obs.update(obs.init(x), x)
  calls = {"init": (obs.init, (x,)), "update": (obs.update, (state, x))}
  calls["calculate_qparams"] = (obs.calculate_qparams, (state,))
  if isinstance(obs, jo.FakeQuantizeBase):
    calls["apply"] = (obs.apply, (state, x))
  return calls


def ops(x):
  """The functional ops, each with its array arguments."""
  s, z = jnp.float32(0.05), jnp.int32(3)
  cs, cz = jnp.full(x.shape[1], 0.05), jnp.zeros(x.shape[1], jnp.int32)
  bs, bz = (
    jnp.full((x.shape[0], x.shape[1] // 128), 0.05),
    jnp.zeros((x.shape[0], x.shape[1] // 128), jnp.int32),
  )
  return {
    "fake_quantize_per_tensor_affine": (
      lambda x: jo.fake_quantize_per_tensor_affine(x, s, z, 0, 255),
      (x,),
    ),
    "fake_quantize_per_channel_affine": (
      lambda x: jo.fake_quantize_per_channel_affine(x, cs, cz, 1, -128, 127),
      (x,),
    ),
    "fake_quantize_learnable_per_tensor_affine": (
      lambda x: jo.fake_quantize_learnable_per_tensor_affine(x, s, jnp.float32(3), 0, 255, 1.0),
      (x,),
    ),
    "quantize": (lambda x: jo.quantize(x, s, z, dtype=jnp.uint8), (x,)),
    "choose_qparams_affine": (
      lambda x: jo.choose_qparams_affine(x, jo.MappingType.SYMMETRIC, (1, 128), jnp.int8),
      (x,),
    ),
    "quantize_affine": (lambda x: jo.quantize_affine(x, (1, 128), bs, bz, jnp.int8), (x,)),
  }


def rows(repeats: int = 30) -> list[common.Row]:
  """One row per config and method: eager ms, with the jitted call's ms as the floor."""
  x = jax.random.normal(jax.random.key(0), (256, 1024))
  out = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    calls = [
      (f"{name}.{method}", call)
      for name, obs in CONFIGS
      for method, call in methods(obs, x).items()
    ]
    calls += [(f"jo.{name}", call) for name, call in ops(x).items()]
    for label, (fn, fargs) in calls:
      jitted = jax.jit(fn)
      jax.block_until_ready(fn(*fargs))  # the first eager call compiles
      jax.block_until_ready(jitted(*fargs))
      before = COMPILES[0]
      t_eager, t_jit = common.median_ms(
        [
          lambda fn=fn, a=fargs: jax.block_until_ready(fn(*a)),
          lambda fn=jitted, a=fargs: jax.block_until_ready(fn(*a)),
        ],
        repeats,
      )
      bar = "meets" if t_eager <= 2 * t_jit + 0.5 else "MISSES"
      note = f"{COMPILES[0] - before} compiles; {bar} eager <= 2 x jit + 0.5 ms"
      out.append(common.Row("eager", f"{label} eager (floor: jitted)", t_eager, t_jit, None, note))
  return out


def main():
  common.script_main(rows, __doc__, repeats=30)


if __name__ == "__main__":
  main()
