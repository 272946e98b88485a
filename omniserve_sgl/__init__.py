"""omniserve-sgl: OmniServe's CPU-GPU attention piggybacking as an SGLang runtime extension."""

__version__ = "0.1.0"
