"""Keep stderr for messages meant for users: library deprecation notices and bitsandbytes' CPU-kernel
notices (we replace those kernels, see finetune/compat/bitsandbytes.py) are for developers, not users."""

from __future__ import annotations

import logging
import warnings


def library_noise_off() -> None:
    """Called once by the CLI before any library is imported; progress bars and real warnings stay."""
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # "Failed to load CPU gemm_4bit_forward from kernels-community": logged at import on AVX512-BF16 CPUs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # On those CPUs bitsandbytes' import also fetches that kernel through the `kernels` package, which logs
    # "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging
    # Face Hub is in offline mode." (offline) or downloads it (online). The kernel serves only the CPU
    # 4-bit GEMV that finetune replaces; nothing else in a finetune process uses `kernels`.
    logging.getLogger("kernels").setLevel(logging.ERROR)
