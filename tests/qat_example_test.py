"""examples/qat_digits.py: QAT int8 accuracy within 1 point of float on held-out digits."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")

from examples import qat_digits


def test_qat_int8_is_within_one_point_of_float():
  result = qat_digits.run(timing=False)
  assert result["float"] > 95.0, result  # the float model really learned the task
  assert abs(result["qat_int8"] - result["float"]) <= 1.0, result
  assert result["ptq_int8"] > 90.0, result
