"""dsv4: an inference engine for DeepSeek-V4-style models, built for long-running agents."""

__version__ = "0.1.0"
