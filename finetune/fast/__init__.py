"""The fast path: compiled regions and fused pieces in training, compiled and graphed decoding.

Below the model code: it works on the modules the model layer builds (the family's classes, routed
experts through their `ExpertsMode`), and reaches the Triton kernels and the compat layer below it."""
