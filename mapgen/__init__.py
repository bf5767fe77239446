"""mapgen: a code-generating mapping compiler for LLM checkpoints (Hugging Face <-> Megatron-Core)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
