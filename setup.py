"""Builds `debias._C` against the torch that is already installed.

    pip install --no-build-isolation .

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) join the build when the
installed torch has CUDA and nvcc is found. The library records the torch it was built
against, so that another torch later compiles the CPU kernels on first use instead of loading
a mismatched library.

A build without torch (plain `pip install .`, whose isolated build environment has none)
makes a pure-Python wheel: the CPU kernels then compile on first use (debias/_build.py).

Switches:

    DEBIAS_NO_EXTENSIONS=1   build nothing compiled (the kernels may still compile on first use)
    DEBIAS_NO_CUDA=1         build only the CPU kernels
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# Triton ships a top-level `triton_kernels` and so does PyPI: ours lives inside debias. The C++
# sources ship inside the package too (debias/csrc), for the build on first use.
PACKAGE_DIR = {"debias.triton_kernels": "triton_kernels", "debias.csrc": "csrc"}
PACKAGE_DATA = {
    "debias": ["data/*"],
    "debias.csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"],
}


def _load_build_module():
    """debias/_build.py by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_debias_build", HERE / "debias" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _say(message: str) -> None:
    print(f"debias: {message}", file=sys.stderr)


def _extensions():
    if _build.flag("DEBIAS_NO_EXTENSIONS"):
        _say("DEBIAS_NO_EXTENSIONS set, building no compiled code")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension
    except ImportError:
        _say(
            "torch is not in this build environment (pip's build isolation), so this is a "
            "pure-Python wheel: the C++ kernels compile on first use (needs a C++ compiler and "
            "ninja). To build them now instead: pip install torch ninja && "
            "pip install --no-build-isolation ."
        )
        return [], {}

    class BuildWithStamp(BuildExtension):
        """Adds the generated source that records the torch version (debias/_build.py)."""

        def build_extensions(self):
            stamp = _build.write_stamp(os.path.join(self.build_temp, "stamp"), torch.__version__)
            for ext in self.extensions:
                if stamp not in ext.sources:
                    ext.sources.append(stamp)
            super().build_extensions()

    root = "csrc"
    sources = _build.cpu_sources(root)
    cxx = list(_build.CXX_FLAGS)
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    cuda_sources = _build.cuda_sources(root)
    want_cuda = not _build.flag("DEBIAS_NO_CUDA") and torch.version.cuda is not None
    if want_cuda and cuda_sources and CUDA_HOME and shutil.which("nvcc"):
        from torch.utils.cpp_extension import CUDAExtension

        ext_cls = CUDAExtension
        sources += cuda_sources
        cxx.append(_build.CUDA_DEFINE)
        extra["nvcc"] = list(_build.NVCC_FLAGS)

    ext = ext_cls(
        _build.EXTENSION,
        sources,
        include_dirs=[os.path.abspath(root)],
        extra_compile_args=extra,
        extra_link_args=list(_build.LINK_FLAGS),
    )
    _say(f"building {_build.EXTENSION} against torch {torch.__version__}")
    return [ext], {"build_ext": BuildWithStamp.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["debias", "debias.*"]) + list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
