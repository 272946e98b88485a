"""omniserve-sgl: OmniServe's CPU-GPU attention piggybacking as an SGLang runtime extension."""

__version__ = "0.1.0"
__all__ = ["OmniServeEndpoint"]


def __getattr__(name: str):
    # Lazy: importing the package must not import SGLang (the worker process never needs it).
    if name == "OmniServeEndpoint":
        from omniserve_sgl.sglang_glue.frontend import OmniServeEndpoint

        return OmniServeEndpoint
    raise AttributeError(f"module 'omniserve_sgl' has no attribute {name!r}")
