"""The jitted QAT train step of ``examples/qat_digits.py`` against its float step, in one process.

For the digits MLP (64 -> 256 -> 256 -> 10, batch 128) and a 1024-wide one (batch 1024): the median
of interleaved repeats of the float train step (the row's floor) and of the same step with the 6
observers + fake quants (input, two activations, three kernels), so ``/ floor`` - 1 is the QAT
overhead (issue 11's targets: 20% and 5%). The models and the step are the example's own.
Run from the repository root: ``python -m benchmarks.qat_bench``.
"""

from __future__ import annotations

try:
  from benchmarks import common
except ImportError:  # run as a script
  import common

from examples import qat_digits  # run from the repository root (python -m benchmarks)

CASES = (  # (hidden, batch, repeats per unit of --repeats, target overhead)
  (256, 128, 20, 0.20),
  (1024, 1024, 1, 0.05),
)


def rows(repeats: int = 15) -> list[common.Row]:
  out = []
  for hidden, batch, per_repeat, target in CASES:
    float_step, qat_step = qat_digits.step_calls(hidden, batch)
    qat_ms, float_ms = common.median_ms([qat_step, float_step], per_repeat * repeats)
    note = f"QAT {100 * (qat_ms / float_ms - 1):+.0f}% (target {100 * target:.0f}%)"
    case = f"train step, hidden {hidden}, batch {batch}, 6 fake quants"
    out.append(common.Row("qat", case, qat_ms, float_ms, note=note))
  return out


def main():
  common.script_main(rows, __doc__, repeats=15)


if __name__ == "__main__":
  main()
