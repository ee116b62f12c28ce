"""Per-group int4 qparams of a 4096 x 4096 float32 weight: jitted JAX vs torchao 0.18, in one process.

The torch side is torchao's own ``choose_qparams_affine`` (``torchao.quantization.quant_primitives``)
on the CPU. Both sides are checked bit-equal before timing (same explicit ``eps``). Reported: medians
of interleaved repeats, and a jitted ``jnp.max`` over the weight (one read of 64 MiB) as the floor.
Run: ``python benchmarks/granularity_bench.py``.
"""

from __future__ import annotations

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np

try:
  from benchmarks import common
except ImportError:  # run as a script
  import common

import jax_observers as jo

EPS = float(np.finfo(np.float32).eps)


def torchao_choose():
  """torchao's ``choose_qparams_affine`` and its MappingType, or None without torchao."""
  if common.torch_or_none() is None:
    return None
  logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA kernels do not load on a CPU
  try:
    from torchao.quantization import quant_primitives as qp
  except ImportError:
    return None
  return qp


def rows(shape=(4096, 4096), group_size: int = 128, repeats: int = 10) -> list[common.Row]:
  qp = torchao_choose()
  w_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  w = jax.block_until_ready(jnp.asarray(w_np))
  floor_fn = jax.jit(jnp.max)
  group = jo.PerGroup(group_size)
  out = []
  for mapping, dtype in (
    (jo.MappingType.SYMMETRIC, jnp.int4),
    (jo.MappingType.ASYMMETRIC, jnp.uint4),
  ):
    qmin, qmax = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
    obs = jo.AffineQuantizedMinMaxObserver(
      mapping_type=mapping, target_dtype=dtype, granularity=group, eps=EPS
    )
    ours = {
      "choose_qparams_affine": jax.jit(
        lambda w, m=mapping, d=dtype: jo.choose_qparams_affine(w, m, (1, group_size), d, eps=EPS)
      ),
      "observer update+qparams": jax.jit(
        lambda w, obs=obs: obs.calculate_qparams(obs.update(obs.init(w), w))
      ),
    }
    theirs = None
    if qp is not None:
      import torch

      w_t = torch.from_numpy(w_np)
      tmap = getattr(qp.MappingType, mapping.name)

      def theirs(tmap=tmap, qmin=qmin, qmax=qmax, w_t=w_t):
        return qp.choose_qparams_affine(w_t, tmap, (1, group_size), torch.int8, qmin, qmax, eps=EPS)

      t_scale, t_zp = theirs()
    for name, fn in ours.items():
      scale, zero_point = fn(w)
      note = ""
      if theirs is not None:
        equal = np.array_equal(np.asarray(scale).reshape(-1), t_scale.numpy().reshape(-1)) and (
          np.array_equal(np.asarray(zero_point).reshape(-1), t_zp.numpy().reshape(-1))
        )
        note = "bit-equal to torchao" if equal else "DIFFERS FROM TORCHAO"
      fns = [lambda fn=fn: jax.block_until_ready(fn(w)), lambda: floor_fn(w).block_until_ready()]
      if theirs is not None:
        fns.append(theirs)
      ms = common.median_ms(fns, repeats)
      label = f"{mapping.name.lower()} {np.dtype(dtype).name} per-group({group_size}) {name}"
      out.append(common.Row("granularity", label, ms[0], ms[1], ms[2] if theirs else None, note))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--cols", type=int, default=4096)
  parser.add_argument("--group-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  print(common.device_description())
  common.print_rows(rows((args.rows, args.cols), args.group_size, args.repeats))


if __name__ == "__main__":
  main()
