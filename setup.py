"""Builds `debias._C` against the torch that is already installed.

    pip install --no-build-isolation .

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) join the build when the
installed torch has CUDA and nvcc is found. Switches:

    DEBIAS_NO_EXTENSIONS=1   build nothing compiled; every op runs on its torch backend
    DEBIAS_NO_CUDA=1         build only the CPU kernels
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# Triton ships a top-level `triton_kernels` and so does PyPI: ours lives inside debias.
PACKAGE_DIR = {"debias.triton_kernels": "triton_kernels"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _extensions():
    if _flag("DEBIAS_NO_EXTENSIONS"):
        print("debias: DEBIAS_NO_EXTENSIONS set, building no compiled code", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension
    except ImportError:
        print(
            "debias: torch is not installed, building no compiled code "
            "(install torch first and build with --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = not _flag("DEBIAS_NO_CUDA") and torch.version.cuda is not None
    if want_cuda and cuda_sources and CUDA_HOME and shutil.which("nvcc"):
        from torch.utils.cpp_extension import CUDAExtension

        ext_cls = CUDAExtension
        # The .cu kernels and the torch-facing .cpp glue that registers them. Objects are
        # named by stem, so a glue file must not share its folder and stem with a .cu.
        sources += cuda_sources + sorted(glob.glob("csrc/cuda/*.cpp"))
        cxx.append("-DDEBIAS_WITH_CUDA")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17", "-DDEBIAS_WITH_CUDA"]

    ext = ext_cls(
        "debias._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["debias", "debias.*"]) + list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"debias": ["data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
