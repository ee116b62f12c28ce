"""Update cost of the min/max observers on 16M float32 values, as ratios measured in one process.

For each observer: the jitted ``update`` time divided by a jitted ``jnp.sum`` over the same array
(the memory-read floor: one pass over 64 MB), and the torch observer's ``forward`` on the same data
divided by ours. Medians over interleaved repeats. Run: ``python benchmarks/observers_bench.py``.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

try:
  from benchmarks import common
except ImportError:  # run as a script
  import common

import jax_observers as jo


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


def rows(elements: int = 1 << 24, repeats: int = 30) -> list[common.Row]:
  torch = common.torch_or_none()
  x_np = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
  x = jax.block_until_ready(jnp.asarray(x_np))
  floor_fn = jax.jit(jnp.sum)
  out = []
  for name, obs, shape in cases(elements):
    xs = x.reshape(shape)
    update = jax.jit(obs.update)
    state = update(obs.init(xs), xs)
    fns = [
      lambda update=update, state=state, xs=xs: jax.block_until_ready(update(state, xs)),
      lambda: floor_fn(x).block_until_ready(),
    ]
    if torch is not None:
      twin, xt = torch_twin(obs), torch.from_numpy(x_np.reshape(shape))
      fns.append(lambda twin=twin, xt=xt: twin(xt))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ms = common.median_ms(fns, repeats)
    label = f"{name} update, {elements / 2**20:.0f}M float32"
    out.append(common.Row("observers", label, ms[0], ms[1], ms[2] if torch else None))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--elements", type=int, default=1 << 24)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  print(common.device_description())
  common.print_rows(rows(args.elements, args.repeats))


if __name__ == "__main__":
  main()
