"""Triton kernels for the routed experts (CUDA; the CPU tests run them under `TRITON_INTERPRET=1`).

Importing this package needs triton; callers that may run without it should import it lazily.
"""

from finetune.kernels.nf4_decode import nf4_expert_gemv
from finetune.kernels.nf4_dequant import nf4_dequantize
from finetune.kernels.nf4_grouped import NF4Weight, nf4_grouped_linear, nf4_grouped_mm

__all__ = ["NF4Weight", "nf4_dequantize", "nf4_expert_gemv", "nf4_grouped_linear", "nf4_grouped_mm"]
