"""Post-training quantization: calibrated weights and DGQ activation quantization (issue 6)."""
