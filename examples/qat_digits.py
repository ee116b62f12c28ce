"""Float training, int8 post-training quantization, then quantization-aware training, on digits.

The data set ships inside scikit-learn (1797 8x8 handwritten digits), so nothing is downloaded.

1. Train a float MLP (64 -> 256 -> 256 -> 10) with Adam.
2. PTQ: insert ``jo.linen.FakeQuant`` on the input, every activation (uint8 affine, moving-average
   observers) and every kernel (int8 per-channel symmetric), calibrate with fake quantization off,
   then evaluate with observers frozen and fake quantization on: int8 inference, simulated.
3. QAT: fine-tune from the PTQ state with observers and fake quantization on (torch's straight-through
   gradients), then evaluate frozen.

Run: ``python examples/qat_digits.py``. It prints the three accuracies and the cost of the 6 observers
and fake quants (input, two activations, three kernels) on a jitted train step against the float
step, for this model and a 1024-wide one at batch 1024 (``benchmarks/qat_bench.py`` times the same).
On a 2-core CPU that is about +25% of this model's 0.5 ms step and +6% of the wide model's 19 ms
step (README, QAT), more when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jax_observers as jo

ACT = jo.FakeQuantize.with_args(
  observer=jo.MovingAverageMinMaxObserver.with_args(averaging_constant=0.01),
  quant_min=0,
  quant_max=255,
)
WEIGHT = jo.FakeQuantize.with_args(
  observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(
    averaging_constant=1.0, dtype=jnp.int8, qscheme=jo.per_channel_symmetric, ch_axis=1
  ),
  quant_min=-128,
  quant_max=127,
)


class QDense(nn.Module):
  features: int
  quant: bool

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (1, self.features))
    if self.quant:
      kernel = jo.linen.FakeQuant(WEIGHT(), name="weight_fq")(kernel)
    return x @ kernel + bias


class MLP(nn.Module):
  quant: bool = False
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    act = (lambda name: jo.linen.FakeQuant(ACT(), name=name)) if self.quant else None
    if act:
      x = act("input_fq")(x)
    for i in range(2):
      x = nn.relu(QDense(self.hidden, self.quant, name=f"dense{i}")(x))
      if act:
        x = act(f"act{i}_fq")(x)
    return QDense(10, self.quant, name="head")(x)


def load(seed=0):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  n = int(0.8 * len(x))
  return (x[:n], y[:n]), (x[n:], y[n:])


def make_step(model, tx):
  @jax.jit
  def step(params, others, opt_state, x, y):
    def loss_fn(p):
      logits, updated = model.apply({"params": p, **others}, x, mutable=list(others))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated

    (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**others, **updated}, opt_state, loss

  return step


def train(model, params, others, data, *, epochs, lr, batch=128, seed=0):
  tx = optax.adam(lr)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  (x, y), rng = data, np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i : i + batch]
      params, others, opt_state, _ = step(params, others, opt_state, x[idx], y[idx])
  return params, others


def accuracy(model, variables, data) -> float:
  x, y = data
  logits = jax.jit(model.apply)(variables, x)
  return float(100 * jnp.mean(jnp.argmax(logits, -1) == y))


def step_calls(hidden: int, batch: int):
  """``(float_step, qat_step)``: one jitted train step each, as zero-argument calls that block.

  A fresh MLP of that width (the QAT one with its 6 quantizers) on a batch of random inputs; both
  steps start from the same params and run the same Adam update.
  """
  float_model, q_model = MLP(hidden=hidden), MLP(quant=True, hidden=hidden)
  x = jnp.asarray(np.random.default_rng(0).random((batch, 64)), jnp.float32)
  y = jnp.zeros(batch, jnp.int32)
  params = jax.jit(float_model.init)(jax.random.key(0), x[:1])["params"]
  observers = jax.jit(q_model.init)(jax.random.key(0), x[:1])["observers"]
  tx = optax.adam(1e-4)
  opt_state = tx.init(params)
  calls = []
  for model, others in ((float_model, {}), (q_model, {"observers": observers})):
    step, args = make_step(model, tx), (params, others, opt_state, x, y)
    calls.append(lambda step=step, args=args: jax.block_until_ready(step(*args)))
  return tuple(calls)


def overhead(hidden: int, batch: int, repeats: int = 30) -> tuple[float, float]:
  """(float step ms, QAT step ms): medians of ``repeats`` interleaved calls of ``step_calls``."""
  calls = step_calls(hidden, batch)
  times = [[] for _ in calls]
  for call in calls:
    call()  # compile
  for _ in range(repeats):
    for call, t in zip(calls, times, strict=True):
      t0 = time.perf_counter()
      call()
      t.append(time.perf_counter() - t0)
  return tuple(1e3 * float(np.median(t)) for t in times)


def run(float_epochs=40, qat_epochs=10, seed=0, timing=True) -> dict[str, float]:
  train_set, test_set = load(seed)
  float_model, q_model = MLP(), MLP(quant=True)
  params = float_model.init(jax.random.key(seed), train_set[0][:1])["params"]
  params, _ = train(float_model, params, {}, train_set, epochs=float_epochs, lr=1e-3, seed=seed)
  result = {"float": accuracy(float_model, {"params": params}, test_set)}

  # PTQ: same params; calibrate the observers with fake quantization off, then evaluate frozen.
  observers = q_model.init(jax.random.key(seed), train_set[0][:1])["observers"]
  calib = jax.jit(lambda v, x: q_model.apply(v, x, mutable=["observers"])[1])
  variables = {"params": params, "observers": jo.disable_fake_quant(observers)}
  for i in range(0, len(train_set[0]), 128):
    variables = {**variables, **calib(variables, train_set[0][i : i + 128])}
  ptq = jo.enable_fake_quant(jo.disable_observer(variables))
  result["ptq_int8"] = accuracy(q_model, ptq, test_set)

  # QAT: fine-tune with observers and fake quantization on, then evaluate frozen.
  qat_start = {"observers": jo.enable_fake_quant(variables["observers"])}
  q_params, others = train(
    q_model, params, qat_start, train_set, epochs=qat_epochs, lr=1e-4, seed=seed + 1
  )
  frozen = {"params": q_params, **jo.disable_observer(others)}
  result["qat_int8"] = accuracy(q_model, frozen, test_set)
  if timing:
    for hidden, batch, repeats in ((256, 128, 300), (1024, 1024, 30)):
      float_ms, qat_ms = overhead(hidden, batch, repeats)
      result[f"step_ms_{hidden}x{batch}"] = (float_ms, qat_ms)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--float-epochs", type=int, default=40)
  parser.add_argument("--qat-epochs", type=int, default=10)
  args = parser.parse_args()
  r = run(args.float_epochs, args.qat_epochs)
  print(
    f"test accuracy: float {r['float']:.2f}%  PTQ int8 {r['ptq_int8']:.2f}%  QAT int8 {r['qat_int8']:.2f}%"
  )
  for key, value in r.items():
    if key.startswith("step_ms_"):
      (float_ms, qat_ms), (hidden, batch) = value, key[len("step_ms_") :].split("x")
      print(
        f"jitted train step, hidden {hidden}, batch {batch}: float {float_ms:.2f} ms, with 6 "
        f"observers + fake quants {qat_ms:.2f} ms ({100 * (qat_ms / float_ms - 1):+.0f}%)"
      )


if __name__ == "__main__":
  main()
