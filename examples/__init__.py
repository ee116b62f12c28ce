"""Runnable examples: `python examples/demo.py` (the README main job) and `python examples/qat_digits.py`."""
