"""The main job: calibrate a small Flax model with several observers and compare them.

Run with ``python examples/demo.py`` (after ``pip install -e '.[demo]'``). It trains a small MLP on
scikit-learn's bundled 8x8 digits, then for each observer (min/max, moving average, torch's histogram
L2 search, percentile, MSE, entropy) calibrates the input and hidden activations through
``jo.linen.Observe`` with a progress bar, simulates 4-bit-activation inference (uint4 activations, int8
per-channel weights) with those qparams, and prints a table of the hidden layer's scale and zero
point, the activations' SQNR and the test accuracy. It writes ``demo_ranges.png``: the hidden
activations' histogram with the range each observer picked.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_observers as jo

U4 = {"dtype": jnp.uint4}  # 4-bit activations: where the clipping range matters
OBSERVERS = {
  "MinMax": jo.MinMaxObserver(**U4),
  "MovingAverage(0.01)": jo.MovingAverageMinMaxObserver(**U4),
  "Histogram (torch L2)": jo.HistogramObserver(**U4),
  "Percentile 99.9": jo.HistogramPercentileObserver(percentile=99.9, **U4),
  "MSE": jo.HistogramMSEObserver(**U4),
  "Entropy (TensorRT)": jo.HistogramEntropyObserver(**U4),
}
WEIGHTS = jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric)


class MLP(nn.Module):
  """64 -> 128 -> 128 -> 10; observes the input and both hidden activations, or with
  ``quantize=True`` fake-quantizes them with the calibrated qparams (PTQ evaluation)."""

  observer: object = None

  @nn.compact
  def __call__(self, x, quantize=False):
    def site(name, h):
      return (
        jo.linen.Observe(self.observer, name=name)(h, quantize=quantize) if self.observer else h
      )

    x = site("input", x)
    for i, width in enumerate((128, 128, 10)):
      x = nn.Dense(width, name=f"dense{i}")(x)
      if i < 2:
        x = site(f"hidden{i}", nn.relu(x))
    return x


def quantize_weights(params):
  """Every kernel fake-quantized to int8 per output channel (symmetric), biases kept."""
  out = {}
  for layer, p in params.items():
    s, z = WEIGHTS.calculate_qparams(WEIGHTS.update(WEIGHTS.init(p["kernel"]), p["kernel"]))
    kernel = jo.fake_quantize_per_channel_affine(p["kernel"], s, z, 1, -128, 127)
    out[layer] = {**p, "kernel": kernel}
  return out


def load_digits_split(seed=0):
  from sklearn.datasets import load_digits

  digits = load_digits()
  x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n = int(0.8 * len(x))
  return (x[order[:n]], y[order[:n]]), (x[order[n:]], y[order[n:]])


def train_float(train, steps=600, seed=0):
  import optax

  model, tx = MLP(), optax.adam(3e-3)
  params = model.init(jax.random.key(seed), train[0][:1])["params"]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y
    ).mean()
    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(train[0]), 128)
    params, opt = step(params, opt, train[0][idx], train[1][idx])
  return params


def calibrate(observer, params, batches, label):
  model = MLP(observer=observer)
  variables = {**model.init(jax.random.key(0), batches[0]), "params": params}
  variables = jo.linen.calibrate(model, variables, batches, progress=f"calibrating {label:<22}")
  return jo.linen.calculate_qparams(model, variables, batches[0]), variables


def accuracy(logits, labels) -> float:
  return float(100 * jnp.mean(jnp.argmax(logits, -1) == labels))


def sqnr_db(x, y) -> float:
  return float(10 * jnp.log10(jnp.sum(x**2) / jnp.maximum(jnp.sum((x - y) ** 2), 1e-30)))


def hidden(params, x):
  """The first hidden activation of the float model (what the table's SQNR is measured on)."""
  return nn.relu(x @ params["dense0"]["kernel"] + params["dense0"]["bias"][None])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="demo_ranges.png", help="where to write the plot")
  parser.add_argument("--batches", type=int, default=12, help="calibration batches of 64")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  train, test = load_digits_split()
  params = train_float(train)
  float_acc = accuracy(MLP().apply({"params": params}, test[0]), test[1])
  batches = [train[0][i * 64 : (i + 1) * 64] for i in range(args.batches)]
  qweights = quantize_weights(params)
  h_test = hidden(params, test[0])
  rows, picked, hist_obs = [], {}, None
  for label, observer in OBSERVERS.items():
    qparams, variables = calibrate(observer, params, batches, label)
    quantized = {**variables, "params": qweights}  # int8 weights, calibrated activations
    acc = accuracy(MLP(observer=observer).apply(quantized, test[0], quantize=True), test[1])
    s, z = qparams["hidden0"]
    h_q = jo.fake_quantize_per_tensor_affine(h_test, s, z, *observer.quant_range)
    rows.append(
      (label, f"{float(s):.5f}", f"{int(z)}", f"{sqnr_db(h_test, h_q):.1f}", f"{acc:.2f}")
    )
    lo, hi = jo.plot.representable_range(observer, qparams["hidden0"])
    picked[label] = (float(lo), float(hi))
    if isinstance(observer, jo.HistogramObserver):
      hist_obs, hist_state = observer, variables["observers"]["hidden0"]["state"]
  header = ("observer (hidden0, uint4)", "scale", "zero_point", "SQNR dB", "test acc %")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]

  def line(row):
    return "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )

  print(
    f"\nfloat accuracy {float_acc:.2f}% on {len(test[0])} held-out digits; int8 weights per channel.\n"
  )
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))
  write_plot(args.out, hist_obs, hist_state, picked)
  print(f"\nwrote {args.out}; {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}")


def write_plot(path, observer, state, picked):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ax = jo.plot.plot_histogram(observer, state, max_grid_lines=32)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for (label, (_, hi)), color in zip(picked.items(), colors[1:] + colors, strict=False):
    ax.axvline(hi, color=color, ls="--", lw=1.2, label=f"{label}: max {hi:.3g}")
  ax.set_title("hidden0 activations and the upper end of each observer's range")
  ax.legend(loc="upper right", fontsize="x-small")
  ax.figure.savefig(path, dpi=110)
  plt.close(ax.figure)


if __name__ == "__main__":
  main()
