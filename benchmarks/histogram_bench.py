"""HistogramObserver and histogram calibrators against torch, measured in one process.

Run: ``python benchmarks/histogram_bench.py``. Prints the best of several timed runs (after a
warm-up/compile) and the ratios the issue asks for:

* a jitted ``update`` on 4M float32 values against torch's ``HistogramObserver.forward``;
* ``calculate_qparams`` (jitted, L2 search on the host) against torch's, on normal data and on the
  "two spikes" input that makes torch's search spin for ~1e5 Python iterations;
* a per-channel (4096 channels x 2048 bins) histogram update, and the ratio of each update to a
  jitted ``jnp.sum`` over the same data (the memory-read floor).

JAX gets device arrays (``jnp.asarray``), as it does inside a model: a NumPy argument would be
copied to the device on every call (16 MiB here), which alone costs ~10x the ``jnp.sum`` floor.
The per-channel update returns a fresh 32 MiB histogram; outside a donating loop each call pays
the page faults of that allocation (glibc maps blocks of 32 MiB and more afresh), so it is also
timed as ``state = update(state, w)`` with ``donate_argnums=0``, the way a calibration loop runs.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jax_observers as jo

N = 4 * 1024 * 1024


def best_ms(fn, *args, repeat: int = 7) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def best_donated_ms(fn, state, *args, repeat: int = 7) -> float:
  """Best time of ``state = fn(state, *args)`` in a loop, ``fn`` donating its ``state``."""
  state = jax.block_until_ready(fn(jax.tree.map(jnp.copy, state), *args))  # the caller's stays
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    state = jax.block_until_ready(fn(state, *args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def main():
  import torch

  warnings.simplefilter("ignore")
  rng = np.random.default_rng(0)
  x_host = rng.standard_normal(N).astype(np.float32)
  xt = torch.from_numpy(x_host)
  x = jax.block_until_ready(jnp.asarray(x_host))
  floor = best_ms(jax.jit(jnp.sum), x, repeat=50)  # sub-ms: scheduler noise needs many tries
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"jnp.sum over {N} float32 (memory-read floor): {floor:.2f} ms")

  obs = jo.HistogramObserver()
  update = jax.jit(obs.update)
  state = update(obs.init(x), x)
  ours = best_ms(update, state, x, repeat=15)
  tobs = torch.ao.quantization.HistogramObserver()
  tobs(xt)
  theirs = best_ms(lambda: tobs(xt))
  print(
    f"update, 4M float32, range unchanged: jax {ours:.2f} ms, torch {theirs:.2f} ms, "
    f"torch/jax {theirs / ours:.2f}x, jax/floor {ours / floor:.1f}x"
  )
  grow = [x_host * np.float32(1 + 0.01 * k) for k in range(8)]
  grow_jax = [jax.block_until_ready(jnp.asarray(g)) for g in grow]
  t0 = time.perf_counter()
  for g in grow_jax:
    state = update(state, g)
  jax.block_until_ready(state)
  ours_g = 1e3 * (time.perf_counter() - t0) / len(grow)
  t0 = time.perf_counter()
  for g in grow:
    tobs(torch.from_numpy(g))
  theirs_g = 1e3 * (time.perf_counter() - t0) / len(grow)
  print(
    f"update, 4M float32, range grows (re-binning): jax {ours_g:.2f} ms, torch "
    f"{theirs_g:.2f} ms, torch/jax {theirs_g / ours_g:.2f}x"
  )

  qparams = jax.jit(obs.calculate_qparams)
  for name, data in (
    ("normal", x_host),
    ("two spikes", np.concatenate([np.zeros(N // 2), np.ones(N // 2)]).astype(np.float32)),
  ):
    s = update(obs.init(data), jnp.asarray(data))
    t = torch.ao.quantization.HistogramObserver()
    t(torch.from_numpy(data))
    ours = best_ms(qparams, s, repeat=20)
    theirs = best_ms(t.calculate_qparams, repeat=3)
    same = np.float32(t.calculate_qparams()[0].item()) == np.asarray(qparams(s).scale)
    print(
      f"calculate_qparams, {name}: jax {ours:.2f} ms, torch {theirs:.2f} ms, "
      f"torch/jax {theirs / ours:.1f}x, same scale: {bool(same)}"
    )

  channels = 4096
  w = jnp.asarray(rng.standard_normal((N // channels, channels)).astype(np.float32))
  floor_c = best_ms(jax.jit(jnp.sum), w, repeat=50)
  for policy in ("pow2", "torch"):
    cal = jo.HistogramPercentileObserver(
      ch_axis=1, qscheme=jo.per_channel_affine, range_policy=policy
    )
    cupdate = jax.jit(cal.update)
    cstate = cupdate(cal.init(w), w)
    ms = best_ms(cupdate, cstate, w)
    donated = best_donated_ms(jax.jit(cal.update, donate_argnums=0), cstate, w)
    print(
      f"per-channel update, {channels} channels x {cal.bins} bins, {w.size} values, "
      f"range_policy={policy!r}, range unchanged: {ms:.2f} ms ({ms / floor_c:.1f}x the "
      f"jnp.sum floor, {floor_c:.2f} ms); state donated: {donated:.2f} ms "
      f"({donated / floor_c:.1f}x)"
    )


if __name__ == "__main__":
  main()
