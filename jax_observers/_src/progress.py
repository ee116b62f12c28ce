"""A one-line progress bar on stderr for calibration loops (no dependency; notebooks show stderr)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def bar(
  items: Iterable[T], label: str, *, total: int | None = None, width: int = 24
) -> Iterator[T]:
  """Yields ``items``, redrawing ``label [####....] i/n`` after each (``i`` alone without a length)."""
  if total is None:
    total = len(items) if hasattr(items, "__len__") else None
  i = 0
  for i, item in enumerate(items, 1):
    yield item
    if total:
      done = int(width * min(i, total) / total)
      sys.stderr.write(f"\r  {label} [{'#' * done}{'.' * (width - done)}] {i}/{total}")
    else:
      sys.stderr.write(f"\r  {label} {i}")
    sys.stderr.flush()
  if i:
    sys.stderr.write("\n")
    sys.stderr.flush()
