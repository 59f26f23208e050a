"""Calibration defaults shared by the pipeline and its CLI (no torch here, so `--help` stays light)."""

CLIPS = ("amax", "percentile", "mse")
DEFAULT_CLIP = {"int8": "mse", "fp8": "amax"}  # fp8's floating grid keeps small values; clipping buys little
SMOOTHQUANT_ALPHA = 0.5  # SmoothQuant's own default for Llama-family models
DECODE_STEPS = 16        # decode steps with a populated cache at the end of each calibration sequence
