"""Builds omniserve_sgl._C from csrc/ against the installed torch (metadata is in pyproject.toml)."""

import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Baseline flags only: the AVX-512 kernels carry their own target pragmas and are chosen at run
# time, so one build runs on any x86-64 CPU (and the portable kernel on other machines).
# -fopenmp: ATen's parallel_for is an inline OpenMP region, serial without it. The linked
# libgomp.so.1 resolves to the copy torch already loaded (same soname), so there is one pool.
cxx_flags = ["-O3", "-fno-math-errno", "-Wall", "-fopenmp"]

setup(
    ext_modules=[
        CppExtension(
            "omniserve_sgl._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
