"""Post-training quantization: timestep-aware calibration data and calibrated weights (:mod:`.calibration`,
:mod:`.weights`), DGQ activation quantization (:mod:`.activations`, :mod:`.attention`, :mod:`.activation_calibration`)."""
