"""Everything that knows DeepSeek-V2. Importing it makes bitsandbytes' CPU 4-bit ops exact on every CPU."""

from finetune.model import cpu_kernels

cpu_kernels.install()
