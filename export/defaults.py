"""Export defaults shared by the pipeline and its CLI (no torch here, so `--help` stays light)."""

DTYPE = "float32"
FLAVOR = "portable"
SEED = 0
# Numeric validation loads the exported graph into ONNX Runtime; above this many weight bytes it
# validates a reduced-depth export of the same checkpoint instead (the full graph is checked structurally).
VALIDATE_MAX_BYTES = int(2.5 * (1 << 30))
