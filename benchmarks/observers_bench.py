"""Update cost of the min/max observers on 16M float32 values, as ratios measured in one process.

For each observer: the jitted ``update`` time divided by a jitted ``jnp.sum`` over the same array
(the memory-read floor: one pass over 64 MB), and divided by the torch observer's ``forward`` on the
same data. Medians over interleaved repeats. Run: ``python benchmarks/observers_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jax_observers as jo


def median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def cases(n):
  side = int(np.sqrt(n))
  return [
    ("MinMaxObserver", jo.MinMaxObserver(), (n,)),
    ("MovingAverageMinMaxObserver", jo.MovingAverageMinMaxObserver(), (n,)),
    ("PerChannelMinMaxObserver ch_axis=0", jo.PerChannelMinMaxObserver(ch_axis=0), (side, side)),
    ("PerChannelMinMaxObserver ch_axis=1", jo.PerChannelMinMaxObserver(ch_axis=1), (side, side)),
    (
      "MovingAveragePerChannelMinMaxObserver ch_axis=0",
      jo.MovingAveragePerChannelMinMaxObserver(ch_axis=0),
      (side, side),
    ),
  ]


def torch_twin(obs):
  import torch.ao.quantization.observer as tobs

  kwargs = {"ch_axis": obs.ch_axis} if hasattr(obs, "ch_axis") else {}
  return getattr(tobs, type(obs).__name__)(**kwargs)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--elements", type=int, default=1 << 24)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  try:
    import torch
  except ImportError:
    torch = None
  x_np = np.random.default_rng(0).standard_normal(args.elements).astype(np.float32)
  x = jnp.asarray(x_np)
  floor_fn = jax.jit(jnp.sum)
  print(
    f"{args.elements / 2**20:.0f}M float32 ({x.nbytes / 2**20:.0f} MiB); {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} cores; jax {jax.__version__}"
    + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
  )
  floor = median_ms(lambda: floor_fn(x).block_until_ready(), args.repeats)
  print(f"floor: jitted jnp.sum {floor:.2f} ms ({x.nbytes / floor / 1e6:.1f} GB/s)\n")
  print(f"{'observer':<50}{'ours ms':>9}{'/floor':>8}{'torch ms':>10}{'torch/ours':>12}")
  for name, obs, shape in cases(args.elements):
    xs = x.reshape(shape)
    update = jax.jit(obs.update)
    state = update(obs.init(xs), xs)
    ours = median_ms(
      lambda update=update, state=state, xs=xs: jax.block_until_ready(update(state, xs)),
      args.repeats,
    )
    floor = median_ms(
      lambda: floor_fn(x).block_until_ready(), args.repeats
    )  # re-measured, interleaved
    theirs = float("nan")
    if torch is not None:
      twin = torch_twin(obs)
      xt = torch.from_numpy(x_np.reshape(shape))
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = median_ms(lambda twin=twin, xt=xt: twin(xt), args.repeats)
    print(f"{name:<50}{ours:>9.2f}{ours / floor:>8.2f}{theirs:>10.2f}{theirs / ours:>12.2f}")


if __name__ == "__main__":
  main()
