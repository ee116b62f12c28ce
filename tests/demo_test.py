"""The README's main job: python examples/demo.py prints a table and writes a PNG."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from examples import demo


def test_demo_prints_one_row_per_observer_and_writes_the_plot(tmp_path, capsys):
  out = tmp_path / "ranges.png"
  demo.main(["--out", str(out), "--batches", "3"])
  lines = capsys.readouterr().out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("observer"))
  rows = lines[header + 2 : header + 2 + len(demo.OBSERVERS)]
  assert [r.split("  ")[0].strip() for r in rows] == list(demo.OBSERVERS)
  for row in rows:
    scale, zero_point, sqnr, acc = row.split()[-4:]
    assert float(scale) > 0 and 0 <= int(zero_point) <= 15
    assert 10 < float(sqnr) < 60 and 80 < float(acc) <= 100
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_mode_accuracy_equals_fake_quant_by_hand():
  """The demo's PTQ evaluation (Observe in quantize mode) against the same model written by hand."""
  import flax.linen as nn
  import jax.numpy as jnp

  import jax_observers as jo

  train, test = demo.load_digits_split()
  params = demo.train_float(train, steps=150)
  observer = demo.OBSERVERS["Percentile 99.9"]
  batches = [train[0][i * 64 : (i + 1) * 64] for i in range(3)]
  qparams, variables = demo.calibrate(observer, params, batches, "percentile")
  quant_min, quant_max = observer.quant_range
  fq = lambda h, site: jo.fake_quantize_per_tensor_affine(h, *qparams[site], quant_min, quant_max)
  h = fq(test[0], "input")
  for i, site in enumerate(("hidden0", "hidden1")):
    layer = params[f"dense{i}"]
    h = fq(nn.relu(h @ layer["kernel"] + layer["bias"][None]), site)
  logits_by_hand = h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]
  logits = demo.MLP(observer=observer).apply(variables, test[0], quantize=True)
  by_hand = float(jnp.mean(jnp.argmax(logits_by_hand, -1) == test[1]))
  assert float(jnp.mean(jnp.argmax(logits, -1) == test[1])) == by_hand
  assert by_hand > 0.8
  assert bool(jnp.allclose(logits, logits_by_hand, rtol=1e-5, atol=1e-5))
