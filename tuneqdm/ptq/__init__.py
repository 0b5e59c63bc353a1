"""Post-training quantization (issue 6): timestep-aware calibration data and calibrated weights (see
:mod:`tuneqdm.ptq.calibration` and :mod:`tuneqdm.ptq.weights`)."""
