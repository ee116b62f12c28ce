"""HistogramObserver and the per-channel calibrators on 4M float32, as ratios measured in one process.

``update`` with the range unchanged and growing (torch's re-binning), ``calculate_qparams`` on
normal data and on torch's slow case ("two spikes"), both against torch's ``HistogramObserver`` on
the same data and a jitted ``jnp.sum`` (the memory-read floor), and the per-channel histogram update
of 4096 channels x 2048 bins (torch has none). Run: ``python benchmarks/histogram_bench.py``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

try:
  from benchmarks import common
except ImportError:  # run as a script
  import common

import jax_observers as jo

N = 4 * 1024 * 1024


def rows(repeats: int = 15, n: int = N) -> list[common.Row]:
  torch = common.torch_or_none()
  warnings.simplefilter("ignore")
  rng = np.random.default_rng(0)
  x_host = rng.standard_normal(n).astype(np.float32)
  x = jax.block_until_ready(jnp.asarray(x_host))
  floor_fn = jax.jit(jnp.sum)
  floor = lambda: floor_fn(x).block_until_ready()
  obs = jo.HistogramObserver()
  update = jax.jit(obs.update)
  state = update(obs.init(x), x)
  out = []
  tobs = None
  if torch is not None:
    xt = torch.from_numpy(x_host)
    tobs = torch.ao.quantization.HistogramObserver()
    tobs(xt)
  fns = [lambda: jax.block_until_ready(update(state, x)), floor]
  if tobs is not None:
    fns.append(lambda: tobs(xt))
  ms = common.median_ms(fns, repeats)
  out.append(
    common.Row(
      "histogram",
      "HistogramObserver update, 4M, range unchanged",
      ms[0],
      ms[1],
      ms[2] if tobs else None,
    )
  )

  grow = [x_host * np.float32(1 + 0.01 * k) for k in range(repeats + 1)]
  grow_jax = [jax.block_until_ready(jnp.asarray(g)) for g in grow]
  holder = {"state": state, "i": 0, "t": None, "ti": 0}
  if torch is not None:
    holder["t"] = torch.ao.quantization.HistogramObserver()
    holder["t"](torch.from_numpy(grow[0]))
  grow_t = [torch.from_numpy(g) for g in grow] if torch is not None else []

  def ours_grow():
    holder["i"] = holder["i"] % len(grow_jax)
    holder["state"] = jax.block_until_ready(update(holder["state"], grow_jax[holder["i"]]))
    holder["i"] += 1

  def theirs_grow():
    holder["ti"] = holder["ti"] % len(grow_t)
    holder["t"](grow_t[holder["ti"]])
    holder["ti"] += 1

  ms = common.median_ms([ours_grow, floor, *([theirs_grow] if torch else [])], repeats)
  out.append(
    common.Row(
      "histogram",
      "HistogramObserver update, 4M, range grows",
      ms[0],
      ms[1],
      ms[2] if torch else None,
      "re-binning",
    )
  )

  qparams = jax.jit(obs.calculate_qparams)
  for name, data in (
    ("normal", x_host),
    ("two spikes", np.concatenate([np.zeros(n // 2), np.ones(n // 2)]).astype(np.float32)),
  ):
    s = update(obs.init(data), jnp.asarray(data))
    fns = [lambda s=s: jax.block_until_ready(qparams(s))]
    same = ""
    if torch is not None:
      t = torch.ao.quantization.HistogramObserver()
      t(torch.from_numpy(data))
      fns.append(t.calculate_qparams)
      equal = np.float32(t.calculate_qparams()[0].item()) == np.asarray(qparams(s).scale)
      same = "same scale as torch" if equal else "SCALE DIFFERS FROM TORCH"
    ms = common.median_ms(fns, max(3, repeats // 3))
    out.append(
      common.Row(
        "histogram",
        f"HistogramObserver calculate_qparams, {name}",
        ms[0],
        None,
        ms[1] if torch else None,
        same,
      )
    )

  channels = 4096
  w = jnp.asarray(rng.standard_normal((n // channels, channels)).astype(np.float32))
  floor_w = jax.jit(jnp.sum)
  for policy in ("pow2", "torch"):
    cal = jo.HistogramPercentileObserver(
      ch_axis=1, qscheme=jo.per_channel_affine, range_policy=policy
    )
    cupdate = jax.jit(cal.update)
    cstate = cupdate(cal.init(w), w)
    ms = common.median_ms(
      [
        lambda c=cupdate, s=cstate: jax.block_until_ready(c(s, w)),
        lambda: floor_w(w).block_until_ready(),
      ],
      max(3, repeats // 3),
    )
    out.append(
      common.Row(
        "histogram",
        f"per-channel histogram update, {channels} ch x {cal.bins} bins, range_policy={policy}",
        ms[0],
        ms[1],
        None,
        "torch has none",
      )
    )
  return out


def main():
  common.script_main(rows, __doc__, repeats=15)


if __name__ == "__main__":
  main()
