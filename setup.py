"""Installs the ``umr`` package and builds the soft-rasterizer extension ``umr._C``.

The extension's sources live in ``external/``: ``*.cpp`` files always (CPU kernel and
bindings), ``*.cu`` files when CUDA is built. CUDA is built when nvcc is found and torch is a
CUDA build, or when ``FORCE_CUDA=1``; ``FORCE_CUDA=0`` disables it. Without a visible GPU the
target architectures default to ``UMR_DEFAULT_CUDA_ARCHS`` (override with
``TORCH_CUDA_ARCH_LIST``). The CPU kernel uses AVX2 when the building machine has it
(``UMR_CPU_SIMD=0`` builds for the baseline x86-64 instruction set, for other machines; the
kernel then runs its per-pixel path, ~1.7x slower).
"""
import glob
import os

from setuptools import find_packages, setup

UMR_DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _want_cuda(torch, cuda_home) -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None:
        return force == "1"
    return cuda_home is not None and torch.version.cuda is not None


def _locate_cuda_home() -> None:
    """Point torch at the CUDA toolkit when ``nvcc`` on PATH is only a wrapper script.

    torch derives CUDA_HOME from ``which nvcc`` (here /usr/local/bin/nvcc -> /usr/local), which
    misses the toolkit's libraries; prefer the conventional /usr/local/cuda when it has nvcc.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cpu_simd_flags() -> list:
    """AVX2 for the CPU kernel's vector lanes when this machine has it (without FMA, so that the
    lanes round exactly as the scalar code); without it the kernel runs its per-pixel path."""
    if os.environ.get("UMR_CPU_SIMD") == "0":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2"] if "avx2" in flags else []


def _extensions():
    cpp_sources = sorted(glob.glob("external/**/*.cpp", recursive=True))
    if not cpp_sources:
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.abspath(d) for d in sorted({os.path.dirname(s) for s in cpp_sources})]
    # no errno from math functions: lets the compiler inline sqrt and keep exp off the slow path
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"] + _cpu_simd_flags()
    if _want_cuda(torch, CUDA_HOME):
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = UMR_DEFAULT_CUDA_ARCHS
        ext = CUDAExtension(
            "umr._C",
            cpp_sources + sorted(glob.glob("external/**/*.cu", recursive=True)),
            include_dirs=include_dirs,
            define_macros=[("UMR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "umr._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="umr",
    version="0.1.0",
    description="UMR: self-supervised single-view 3D reconstruction via semantic consistency (modern reimplementation)",
    license="MIT",
    packages=find_packages(include=["umr", "umr.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
