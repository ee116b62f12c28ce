"""examples/qat_digits.py: QAT int8 accuracy within 1 point of float on held-out digits."""

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")

_PATH = pathlib.Path(__file__).parent.parent / "examples" / "qat_digits.py"
_spec = importlib.util.spec_from_file_location("qat_digits", _PATH)
qat_digits = importlib.util.module_from_spec(_spec)
sys.modules["qat_digits"] = qat_digits  # flax modules resolve annotations through it
_spec.loader.exec_module(qat_digits)


def test_qat_int8_is_within_one_point_of_float():
  result = qat_digits.run(timing=False)
  assert result["float"] > 95.0, result  # the float model really learned the task
  assert abs(result["qat_int8"] - result["float"]) <= 1.0, result
  assert result["ptq_int8"] > 90.0, result
