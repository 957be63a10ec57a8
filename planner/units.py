"""Byte and FLOP unit constants: one source of truth for every conversion."""

KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 10**9
TFLOP = 10**12

# Bytes per element of each numeric storage type.
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "nf4": 0.5, "fp4": 0.5}
