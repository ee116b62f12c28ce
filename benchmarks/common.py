"""What every benchmark shares: the machine's description, interleaved timing, result rows."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import numpy as np


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def torch_or_none():
  """torch, when it is installed and runs on the device JAX uses (the CPU, or CUDA for a GPU)."""
  try:
    import torch
  except ImportError:
    return None
  backend = jax.default_backend()
  if backend == "cpu" or (backend == "gpu" and torch.cuda.is_available()):
    return torch
  return None


def device_description() -> dict:
  torch = torch_or_none()
  device = jax.devices()[0]
  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "torch": None if torch is None else torch.__version__,
    "torch_threads": None if torch is None else torch.get_num_threads(),
    "date": time.strftime("%Y-%m-%d"),
  }


def median_ms(fns, repeats: int) -> list[float]:
  """Medians in ms of ``fns`` run interleaved ``repeats`` times, after one warm-up call each.

  Each ``fn`` must block until its result is ready.
  """
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for t, fn in zip(times, fns, strict=True):
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [1e3 * float(np.median(t)) for t in times]


@dataclasses.dataclass
class Row:
  """One measurement: ours against a memory-read floor and against torch on the same input."""

  bench: str
  case: str
  ours_ms: float
  floor_ms: float | None = None  # a jitted jnp.sum / jnp.max over the same input
  torch_ms: float | None = None
  note: str = ""

  @property
  def vs_floor(self) -> float | None:
    return None if self.floor_ms is None else self.ours_ms / self.floor_ms

  @property
  def torch_over_ours(self) -> float | None:
    return None if self.torch_ms is None else self.torch_ms / self.ours_ms

  def as_dict(self) -> dict:
    return {
      **dataclasses.asdict(self),
      "vs_floor": self.vs_floor,
      "torch_over_ours": self.torch_over_ours,
    }


def _fmt(v, spec=".2f") -> str:
  return "" if v is None else format(v, spec)


def print_rows(rows: list[Row], *, markdown: bool = False) -> None:
  """One table: case, ours ms, / floor, torch ms, torch / ours (above 1: we are faster)."""
  header = ("benchmark", "case", "ours ms", "/ floor", "torch ms", "torch / ours", "note")
  cells = [
    (
      r.bench,
      r.case,
      _fmt(r.ours_ms, ".3f"),
      _fmt(r.vs_floor),
      _fmt(r.torch_ms, ".3f"),
      _fmt(r.torch_over_ours),
      r.note,
    )
    for r in rows
  ]
  if markdown:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c in cells:
      print("| " + " | ".join(c) + " |")
    return
  widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
  for c in (header, *cells):
    print(
      "  ".join(
        x.ljust(w) if i in (0, 1, 6) else x.rjust(w)
        for i, (x, w) in enumerate(zip(c, widths, strict=True))
      )
    )


def script_main(rows, doc: str, repeats: int) -> None:
  """A benchmark script run alone: ``--repeats``, the machine's description, then its table."""
  parser = argparse.ArgumentParser(description=doc)
  parser.add_argument("--repeats", type=int, default=repeats)
  args = parser.parse_args()
  print(device_description())
  print_rows(rows(repeats=args.repeats))
