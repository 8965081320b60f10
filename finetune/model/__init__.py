"""Everything that knows DeepSeek-V2 lives in this package."""
