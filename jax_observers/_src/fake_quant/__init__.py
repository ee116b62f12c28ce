"""Fake quantization: torch's ops and their gradients, ``FakeQuantize`` and its fused and learnable
(LSQ) variants, their states, flag toggles, torch state-dict layouts and presets."""
