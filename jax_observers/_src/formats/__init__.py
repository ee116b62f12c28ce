"""Scale formats beyond integer affine: FP8 (current and delayed scaling), OCP MX and power-of-two
scales."""
