"""Kernels for the routed experts: Triton (CUDA; the CPU tests run them under `TRITON_INTERPRET=1`) in
`nf4_grouped`, `nf4_dequant`, `nf4_decode` and `nf4_pairs`, which need triton to import; `nf4_torch`, the
NF4 format in plain torch, does not. Nothing is imported here, so callers that may run without triton
import the Triton modules where they use them."""
