"""Ops: the public entry points, their custom ops (what torch.compile sees) and the choice of
backend. One module per op, named as the op's files in csrc/, triton_kernels/, tests/ and
benchmarks/."""
