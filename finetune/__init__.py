"""Parameter-efficient fine-tuning and RL alignment for DeepSeek-V2-family MoE models."""

__version__ = "0.1.0"
