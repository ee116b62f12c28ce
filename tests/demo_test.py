"""The README's main job: python -m jax_observers.demo prints a table and writes a PNG."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from jax_observers import demo


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
