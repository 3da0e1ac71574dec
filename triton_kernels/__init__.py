"""Triton kernels, one file per op (``@triton.jit`` kernels and their launchers).

Installed as ``debias.triton_kernels``: Triton and PyPI each ship a top-level
``triton_kernels`` of their own, so this folder must never be installed at the top level.
Nothing here imports triton at package import time; each op module does, when first used.
"""
