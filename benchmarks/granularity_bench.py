"""Per-group int4 qparams of a 4096 x 4096 float32 weight: jitted JAX vs torch, in one process.

torchao's ``choose_qparams_affine`` cannot be installed next to torch 2.13, which ships only the
abstract ``AffineQuantizedObserverBase``; the torch side is therefore torchao's algorithm in torch's
eager CPU ops, in torchao's order (view into groups, amin, amax, widen to 0, divide, clamp, round,
clamp): what torchao runs on CPU. Both sides are checked bit-equal before timing. Reported: medians
of interleaved repeats, and a jitted ``jnp.max`` over the weight (one read of 64 MiB) as the floor.
Run: ``python benchmarks/granularity_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_observers as jo

EPS = float(np.finfo(np.float32).eps)


def torch_choose_qparams_affine(torch, w, group_size, mapping, qmin, qmax):
  """torchao's choose_qparams_affine for PerGroup on a 2-D weight, in torch ops."""
  v = w.view(w.shape[0], w.shape[1] // group_size, group_size)
  mn, mx = torch.amin(v, dim=[2]), torch.amax(v, dim=[2])
  min_neg, max_pos = torch.min(mn, torch.zeros_like(mn)), torch.max(mx, torch.zeros_like(mx))
  if mapping == jo.MappingType.SYMMETRIC:
    scale = torch.clamp(torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2), min=EPS)
    return scale, torch.full_like(scale, int((qmax + qmin + 1) / 2)).to(torch.int32)
  scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=EPS)
  zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
  return scale, zero_point.to(torch.int32)


def median_ms(fns, repeats):
  """Medians (ms) of ``fns`` run interleaved ``repeats`` times after one warm-up each."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for t, fn in zip(times, fns, strict=True):
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [1e3 * float(np.median(t)) for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--cols", type=int, default=4096)
  parser.add_argument("--group-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  import torch

  w_np = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
  w, w_t = jnp.asarray(w_np), torch.from_numpy(w_np)
  print(
    f"{args.rows}x{args.cols} float32 ({w_np.nbytes / 2**20:.0f} MiB), groups of {args.group_size}"
    f"; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}"
    f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  )
  floor_fn = jax.jit(jnp.max)
  (floor,) = median_ms([lambda: floor_fn(w).block_until_ready()], args.repeats)
  print(f"floor: jitted jnp.max {floor:.2f} ms\n")
  print(
    f"{'int4 per-group qparams':<40}{'ours ms':>9}{'/floor':>8}{'torch ms':>10}{'torch/ours':>12}"
  )
  group = jo.PerGroup(args.group_size)
  for mapping, dtype in (
    (jo.MappingType.SYMMETRIC, jnp.int4),
    (jo.MappingType.ASYMMETRIC, jnp.uint4),
  ):
    qmin, qmax = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
    obs = jo.AffineQuantizedMinMaxObserver(
      mapping_type=mapping, target_dtype=dtype, granularity=group
    )
    ours = {
      "choose_qparams_affine": jax.jit(
        lambda w, m=mapping, d=dtype: jo.choose_qparams_affine(w, m, group, d)
      ),
      "observer update+qparams": jax.jit(
        lambda w, obs=obs: obs.calculate_qparams(obs.update(obs.init(w), w))
      ),
    }

    def theirs(mapping=mapping, qmin=qmin, qmax=qmax):
      return torch_choose_qparams_affine(torch, w_t, args.group_size, mapping, qmin, qmax)

    t_scale, t_zp = theirs()
    for name, fn in ours.items():
      scale, zero_point = fn(w)
      np.testing.assert_array_equal(np.asarray(scale), t_scale.numpy())  # same numbers, bit for bit
      np.testing.assert_array_equal(np.asarray(zero_point), t_zp.numpy())
      ms, torch_ms = median_ms([lambda fn=fn: jax.block_until_ready(fn(w)), theirs], args.repeats)
      label = f"{mapping.name.lower()[:4]} {np.dtype(dtype).name} {name}"
      print(f"{label:<40}{ms:>9.2f}{ms / floor:>8.2f}{torch_ms:>10.2f}{torch_ms / ms:>12.2f}")


if __name__ == "__main__":
  main()
