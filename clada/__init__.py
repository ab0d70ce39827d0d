"""CLADA: training-free adaptive activation sparsity for LLM decoding.

Sub-packages:
- ``clada.runtime``: patches a transformers model from a threshold artifact (no optuna/datasets/click).
- ``clada.artifacts``: the safetensors artifact format (read, write, validate).
- ``clada.calibrate``: the offline calibration toolchain and CLI.
"""

__version__ = "0.1.0"
