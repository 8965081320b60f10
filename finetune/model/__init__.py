"""The model code: loading (4-bit, streamed experts), adapters, routing, export. The family's classes come from
`finetune.family`; nothing is patched on import (`finetune.compat`)."""
