"""The main job: calibrate observers on realistic activations and weights, print a qparams table.

Run with ``python -m jax_observers.demo``. It builds a small two-layer GELU network with a heavy-tailed
input (a few outlier features, as in transformer activations), streams 32 calibration batches
through jit-compiled observer updates, and reports for each observer the scale, the zero point and
the signal-to-quantization-noise ratio (SQNR) on a held-out batch.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_observers as jo


def fake_quant(x, scale, zero_point, qmin, qmax, axis=None):
  """Quantize-dequantize with the given qparams (per tensor, or per channel along ``axis``)."""
  if axis is not None:
    shape = [1] * x.ndim
    shape[axis] = -1
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
  q = jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)
  return (q - zero_point) * scale


def sqnr_db(x, y) -> float:
  return float(10 * jnp.log10(jnp.sum(x**2) / jnp.maximum(jnp.sum((x - y) ** 2), 1e-30)))


def make_data(seed=0, batches=32, batch=256, features=64, hidden=128):
  """Activations of a random GELU layer on inputs with a few outlier features, and its weights."""
  keys = jax.random.split(jax.random.key(seed), 4)
  w = jax.random.laplace(keys[0], (features, hidden)) / np.sqrt(features)
  w = w.at[:, :4].multiply(8.0)  # a few hidden units with large weights (per-channel matters)
  outlier = jnp.ones(features).at[:3].set(20.0)
  xs = jax.random.normal(keys[1], (batches + 1, batch, features)) * outlier
  acts = jax.nn.gelu(xs @ w)
  return acts[:-1], acts[-1], w


OBSERVERS = {
  "MinMax uint8 affine": jo.MinMaxObserver(),
  "MinMax int8 symmetric": jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric),
  "MovingAverage c=0.01": jo.MovingAverageMinMaxObserver(),
  "MovingAverage c=0.1": jo.MovingAverageMinMaxObserver(averaging_constant=0.1),
  "PerChannel uint8 (axis -1)": jo.PerChannelMinMaxObserver(ch_axis=-1),
  "MA PerChannel (axis -1)": jo.MovingAveragePerChannelMinMaxObserver(ch_axis=-1),
}


def calibrate(obs, batches):
  update = jax.jit(obs.update)
  state = obs.init(batches[0])
  for x in batches:
    state = update(state, x)
  return obs.calculate_qparams(state)


def main() -> None:
  start = time.perf_counter()
  calib, held_out, weights = make_data()
  rows = []
  for name, obs in OBSERVERS.items():
    scale, zero_point = calibrate(obs, calib)
    qmin, qmax = obs.quant_range
    axis = -1 if obs.qscheme.is_per_channel else None
    y = fake_quant(held_out, scale, zero_point, qmin, qmax, axis)
    shown = (lambda a: f"{float(a):.6g}") if axis is None else (lambda a: f"[{a.size} ch]")
    rows.append((name, shown(scale), shown(zero_point), f"{sqnr_db(held_out, y):.1f}"))
  w_obs = jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric)
  ws, wz = calibrate(w_obs, [weights])
  yw = fake_quant(weights, ws, wz, *w_obs.quant_range, axis=1)
  rows.append(
    ("weights: PerChannel int8 sym", f"[{ws.size} ch]", "0", f"{sqnr_db(weights, yw):.1f}")
  )
  t_obs = jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
  ts, tz = calibrate(t_obs, [weights])
  yt = fake_quant(weights, ts, tz, *t_obs.quant_range)
  rows.append(
    ("weights: per-tensor int8 sym", f"{float(ts):.6g}", "0", f"{sqnr_db(weights, yt):.1f}")
  )

  header = ("observer", "scale", "zero_point", "SQNR dB")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
  line = lambda r: "  ".join(
    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
  )
  print(
    f"Calibrated on {calib.shape[0]} batches of {calib.shape[1:]} GELU activations; SQNR on a held-out batch.\n"
  )
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(line(r))
  print(
    f"\njax {jax.__version__} on {jax.devices()[0].platform}; {time.perf_counter() - start:.1f} s"
  )


if __name__ == "__main__":
  main()
