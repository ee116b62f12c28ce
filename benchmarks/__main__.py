"""Every benchmark on whatever backend JAX has, one table of ratios, and a JSON file.

``python -m benchmarks`` (``--markdown`` prints the table for the README; ``--json PATH`` chooses
where the results go, default ``benchmarks/results.json``). Ratios: ours / the memory-read floor (a
jitted ``jnp.sum`` or ``jnp.max`` over the same input; for the eager rows, the jitted call), and
torch / ours where torch runs on the same device (above 1: ours is faster). Under 5 minutes on the
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from benchmarks import (
  common,
  eager_bench,
  granularity_bench,
  histogram_bench,
  observers_bench,
  qat_bench,
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--json", default=str(pathlib.Path(__file__).parent / "results.json"))
  parser.add_argument("--markdown", action="store_true")
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  machine = common.device_description()
  rows = []
  rows += observers_bench.rows(repeats=args.repeats)
  rows += histogram_bench.rows(repeats=args.repeats)
  rows += granularity_bench.rows(repeats=max(3, args.repeats // 2))
  rows += eager_bench.rows(repeats=args.repeats)
  rows += qat_bench.rows(repeats=args.repeats)
  seconds = time.perf_counter() - start
  print(
    f"{machine['cpu']} ({machine['cores']} cores), JAX {machine['jax']} on {machine['backend']} "
    f"({machine['device']}), torch {machine['torch']} ({machine['torch_threads']} threads), "
    f"{machine['date']}; {seconds:.0f} s"
  )
  common.print_rows(rows, markdown=args.markdown)
  result = {"machine": machine, "seconds": seconds, "rows": [r.as_dict() for r in rows]}
  pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
