"""Stand-in for ``sgl_kernel`` on CPU-only development machines (installed by
``scripts/setup.sh``; never on a GPU machine, where the real package is used).

The real package on PyPI is a CUDA build that cannot be imported without ``libcuda.so.1``.
SGLang imports names from it at module load but, on the CPU device, calls its ``*_cpu`` kernels
only on Intel AMX machines (``cpu_has_amx_support()``). Every attribute here is a function that
raises ``NotImplementedError`` naming itself when called. Submodules are deliberately absent:
SGLang guards those imports with ``except ImportError`` fallbacks.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this machine uses omniserve-sgl's CPU stand-in "
            "for sgl_kernel (the real sgl-kernel is a CUDA build)"
        )

    missing.__name__ = missing.__qualname__ = name
    return missing
