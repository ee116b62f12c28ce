"""Eager calls against explicitly jitted ones: what a notebook user pays per call.

For each config and public method, on a 256x1024 float32 input: the median time of the eager call
(``obs.update(state, x)``, which dispatches to a cached compile) and of ``jax.jit(obs.update)``,
their ratio and the absolute difference, and how many compiles the repeated eager calls triggered
(counted with ``jax.monitoring``; 0 is the target). The bar: eager <= 2x jit + 0.5 ms.
Run: ``python benchmarks/eager_bench.py``.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import jax
import numpy as np

import jax_observers as jo

COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
  lambda event, duration, **kw: (
    COMPILES.__setitem__(0, COMPILES[0] + 1)
    if event == "/jax/core/compile/backend_compile_duration"
    else None
  )
)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def median_ms(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


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
  state = obs.init(x)
  state = obs.update(state, x)
  calls = {"init": (obs.init, (x,)), "update": (obs.update, (state, x))}
  calls["calculate_qparams"] = (obs.calculate_qparams, (state,))
  if isinstance(obs, jo.FakeQuantizeBase):
    calls["apply"] = (obs.apply, (state, x))
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (256, 1024))
  print(f"{cpu_model()}, JAX {jax.__version__} on {jax.devices()[0].device_kind}")
  print(
    f"{'config':<31} {'method':<18} {'eager ms':>9} {'jit ms':>8} {'ratio':>6} {'+ms':>6} compiles"
  )
  worst = 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name, obs in CONFIGS:
      for method, (fn, fargs) in methods(obs, x).items():
        jitted = jax.jit(fn)
        t_jit = median_ms(lambda fn=jitted, a=fargs: fn(*a), args.repeats)
        jax.block_until_ready(fn(*fargs))  # the first eager call compiles
        before = COMPILES[0]
        t_eager = median_ms(lambda fn=fn, a=fargs: fn(*a), args.repeats)
        compiles = COMPILES[0] - before
        bar = 2 * t_jit + 0.5
        worst = max(worst, t_eager / bar)
        print(
          f"{name:<31} {method:<18} {t_eager:9.3f} {t_jit:8.3f} {t_eager / t_jit:6.2f} "
          f"{t_eager - t_jit:6.3f} {compiles}"
        )
  print(f"worst eager / (2 x jit + 0.5 ms): {worst:.2f} (<= 1 meets the bar)")


if __name__ == "__main__":
  main()
