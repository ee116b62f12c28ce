"""torchao's affine quantization: granularities and block grids, ``choose_qparams_affine``,
``quantize_affine``/``dequantize_affine`` and the affine-quantized observers."""
