"""GPU code compiled on a machine without a GPU.

Triton: every kernel of triton_kernels/ is compiled, through its own launcher, in each
configuration the launcher can pick, to cubins for sm_80 and sm_90 (Triton's compiler and
ptxas need no GPU). A compile error, a register spill, or shared memory over the target's
per-block limit fails; so do the PTX patterns the kernels rely on (16-byte loads and stores,
no fused multiply-add where fp fusion is off, tensor-core products). Every case adds a row to
benchmarks/results/gpu_compile.md (kernel, config, target, registers, stack, spills, shared
bytes), written when all of them ran; DEBIAS_GPU_COMPILE_TABLE=path writes it there instead.
Failures known on older Tritons are listed in OLD_TRITON_FAILURES with the fix each awaits.

How the cases follow the code. Each case calls the real launcher (noise_loss.add_noise,
noise_loss.noise_loss, noise_loss.philox_fill, knn.candidates) on small CPU tensors with the
kernel objects swapped for recorders, then hands the recorded arguments to Triton's own
binder, so the signature, the constexprs, the integer and alignment specialisations, num_warps
and enable_fp_fusion are those a launch on a GPU would compile. What a launcher picks from
the shapes comes from its helpers: noise_loss's (TILE, CHUNK) from `_split`, knn's tiles and
warps from `_tiles` (called with a CUDA device, the branch a GPU takes). No kernel is
autotuned: each launch has one configuration, fixed by the shapes and flags.

The space is cut, not sampled. noise_loss: every flag, dtype and mode at the split of large
samples (TILE 1024, CHUNK 16384, several chunks a sample; D a multiple of 16), every other
split with the heaviest flags (Philox stream, both terms, loss and gradient), and D off the
16-element grid; noise dtypes other than the prediction's with both terms. The loss kinds and
masks (KIND x HAS_MASK, INNER1): each pair at the large split with the heaviest flags; the
heaviest pair (pseudo-Huber, a mask with inner > 1) loss-only, gradient-only, with each
term, and at every other split. add_noise's perturbation (PERTURBED, HAS_XI): each source of
eps and xi at the large split, both streams at every split. Registers grow with TILE, the
elements a thread holds, and with the code paths the flags switch on, so each axis is
compiled at its worst. knn: COUNT is a constexpr with 128 values; `_tiles` maps them
onto a few tile configurations, compiled at the largest COUNT of each and at COUNT 1.

The kernels compile in separate processes, one per core, fed every selected case up front:
Triton's interpreter, which the rest of the suite runs on the CPU, can leave triton.language
patched, and compilation must not see that.

CUDA: the sources of the CUDA build as debias/_build.py lists them, each .cu with plain nvcc
and the build's NVCC_FLAGS for sm_80 + sm_90, each torch-facing .cpp (the glue) to an object
file with the build's C++ flags against the installed torch's headers (a CPU build of torch
ships c10/cuda/ but not its generated cuda_cmake_macros.h, which only matters on Windows:
C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it). Skipped, with the reason, when nvcc is absent.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "gpu_compile.md"
TABLE_ENV = "DEBIAS_GPU_COMPILE_TABLE"

# (name, capability) and the most shared memory one block may have on it (the opt-in limit of
# cudaFuncAttributeMaxDynamicSharedMemorySize, static shared memory included).
TARGETS = {"sm80": 80, "sm90": 90}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

HAVE_TRITON = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec("triton.backends.nvidia") is not None
)

# ---- the kernels, compiled rather than interpreted ----------------------------------------


def _kernels(op: str):
    """debias.triton_kernels.<op> in the compiling process, where its kernels are JIT
    functions (TRITON_INTERPRET is unset there)."""
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"debias.triton_kernels.{op}")
    assert any(isinstance(v, JITFunction) for v in vars(module).values()), (
        f"debias.triton_kernels.{op} holds no JIT functions: TRITON_INTERPRET is on"
    )
    return module


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _launches(op: str, call):
    """[(jit function, args, kwargs)] of the kernels that ``call(module)`` launches."""
    from triton.runtime.jit import JITFunction

    module = _kernels(op)
    calls = []
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, JITFunction)}
    try:
        for name, fn in kernels.items():
            setattr(module, name, _Recorder(fn, calls))
        call(module)
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    assert calls, f"{op}: the launcher launched no kernel"
    return calls


def _compile(fn, args, kwargs, capability: int):
    """What `fn[grid](*args, **kwargs)` compiles on a GPU of ``capability``: Triton's binder
    and argument packing (the same calls in Triton 3.6 to 3.9), with the target given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(source, target=target, options=options.__dict__)
    return bound, signature, kernel, (backend, options)


def _ptxas_spills(backend, options, kernel, capability: int) -> int:
    """Bytes of spill stores + loads that ptxas reports for the kernel's PTX, run as Triton
    runs it (the backend's make_cubin, with its log printed to a file)."""
    from triton import knobs

    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        knobs.nvidia.dump_ptxas_log = True
        try:
            backend.make_cubin(kernel.asm["ptx"], {}, options, capability)
        finally:
            knobs.nvidia.dump_ptxas_log = False
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        text = log.read()
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert found, text[-2000:]
    return sum(int(a) + int(b) for a, b in found)


def _resources(cubin: bytes, name: str) -> dict[str, int]:
    """REG, STACK, SHARED (static), LOCAL of the kernel in a cubin, as cuobjdump reads them.
    Spilled registers live in the stack frame, so a kernel without one has no spills; one with
    a frame may only hold a call's (fp64 division), which ptxas' log tells apart."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    assert tool, "cuobjdump not found (Triton's NVIDIA backend ships one)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    assert found, out
    return {k: int(v) for k, v in found.items()}


def _vector_bytes(ptx: str, op: str) -> set[int]:
    """Bytes moved per global ``op`` (ld or st) vector instruction in ``ptx``."""
    found = re.findall(rf"\b{op}\.global(?:\.\w+)*?\.v(\d)\.[bfsu](\d+)", ptx)
    return {int(n) * int(bits) // 8 for n, bits in found}


# ---- the cases ----------------------------------------------------------------------------

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
BATCH = 3  # not 1, not a multiple of 16: Triton specialises neither
SEED, OFFSET = 2**40 + 7, 2**33 + 5  # Philox keys are int64 (debias/ops/noise_loss.py)
NOISE_TERMS = {  # id: (terms, noise given)
    "eps-given": (1, True),
    "eps-stream": (1, False),
    "x0": (2, False),
    "eps+x0-given": (3, True),
    "eps+x0-stream": (3, False),
}
LOSS_MODES = {  # id: (need_loss, need_grad, grad_output shape)
    "loss": (True, False, None),
    "loss+grad": (True, True, None),
    "grad-go1": (False, True, ()),
    "grad-goB": (False, True, (BATCH,)),
}
KINDS = {"l2": 0, "l1": 1, "huber": 2}  # the kernels' KIND (Kind of csrc/noise_loss.h)
# Masks by their inner stride, of size D / 3: [B, 1, H, W] of [B, 3, H, W] (inner 1) and
# [B, N, 1] of [B, N, 3] (inner 3). Only HAS_MASK and INNER1 (inner == 1) change the code:
# the mask's integers are not specialised on, so a mask shared by the batch (stride 0)
# compiles as a per-sample one.
MASKS = {"nomask": None, "mask_pixel": 1, "mask_inner": 3}
XI = {"noxi": None, "xi_stream": False, "xi_given": True}  # add_noise's perturbation


class Case(NamedTuple):
    id: str
    op: str
    call: object  # module -> None: calls the launcher


def _split_sizes(split) -> dict[tuple[int, int], int]:
    """One sample size D per (TILE, CHUNK) that ``split`` picks: the largest power of two
    giving it (a multiple of 16, one chunk a sample), and for the largest chunk 3 chunks a
    sample (a 3 x 128 x 128 image)."""
    sizes = {}
    for e in range(0, 15):
        sizes[split(2**e)[:2]] = 2**e
    top = max(sizes, key=lambda tc: (tc[1], tc[0]))
    sizes[top] = 3 * top[1]
    return sizes


def _coef(rows: int, compute: torch.dtype) -> torch.Tensor:
    return torch.ones(rows, BATCH, dtype=compute)


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_noise_case(dt: str, given: bool, D: int, xi: str = "noxi") -> Case:
    xi_given = XI[xi]

    def call(k):
        x0 = torch.zeros(BATCH, D, dtype=DTYPES[dt])
        rows = 2 if xi_given is None else 3  # row g: the input is perturbed
        k.add_noise(
            x0,
            _coef(rows, _compute(x0.dtype)),
            x0.clone() if given else None,
            SEED,
            OFFSET,
            x0.clone() if xi_given else None,
            SEED + 1,
            OFFSET + 1,
        )

    noise = "given" if given else "stream"
    perturbed = "" if xi_given is None else f"-{xi}"
    return Case(f"add_noise-{dt}-{noise}{perturbed}-D{D}", "noise_loss", call)


def _loss_case(
    pt: str, nt: str, terms_id: str, mode: str, D: int, kind: str = "l2", mask: str = "nomask"
) -> Case:
    """A noise_loss launch; the id names kind and mask only when they are not l2 unmasked
    (the cases and ids from before the kinds stay as they were)."""
    terms, given = NOISE_TERMS[terms_id]
    need_loss, need_grad, go_shape = LOSS_MODES[mode]

    def call(k):
        pred = torch.zeros(BATCH, D, dtype=DTYPES[pt])
        data = torch.zeros(BATCH, D, dtype=DTYPES[nt])
        compute = _compute(pred.dtype)
        inner, size, values = 1, 1, None
        if MASKS[mask] is not None:
            inner, size = MASKS[mask], max(1, D // 3)
            values = torch.ones(BATCH * size, dtype=compute)
        k.noise_loss(
            pred,
            _coef(4 if KINDS[kind] == 2 else 3, compute),
            data if terms & 1 and given else None,
            data.clone() if terms & 2 else None,
            terms,
            data.dtype,
            SEED,
            OFFSET,
            KINDS[kind],
            values,
            inner,
            size,
            size,
            grad_div=BATCH,
            loss_div=BATCH,
            need_loss=need_loss,
            need_grad=need_grad,
            grad_output=None if go_shape is None else torch.ones(go_shape, dtype=compute),
        )

    extra = "" if (kind, mask) == ("l2", "nomask") else f"-{kind}-{mask}"
    return Case(
        f"noise_loss-pred_{pt}-noise_{nt}-{terms_id}-{mode}{extra}-D{D}", "noise_loss", call
    )


def _philox_case(dt: str, n: int) -> Case:
    def call(k):
        k.philox_fill(torch.empty(n, dtype=DTYPES[dt]), SEED, OFFSET)

    return Case(f"philox_fill-{dt}-n{n}", "noise_loss", call)


def _knn_case(dt: str, count: int, d: int) -> Case:
    def call(k):
        cuda = torch.device("cuda")
        real = k._tiles
        k._tiles = lambda count, dtype, device: real(count, dtype, cuda)
        try:
            q = torch.zeros(100, d, dtype=DTYPES[dt])
            y = torch.zeros(1000, d, dtype=DTYPES[dt])
            k.candidates(q, y, q.sum(1), y.sum(1), count, splits=1)
        finally:
            k._tiles = real

    return Case(f"knn-{dt}-count{count}-d{d}", "knn", call)


def _cases() -> list[Case]:
    if not HAVE_TRITON:
        return []
    # The package's own modules, for their pure-Python helpers only (under conftest they hold
    # the interpreter's kernels, which the rest of the suite runs).
    from debias.triton_kernels import knn, noise_loss

    sizes = _split_sizes(noise_loss._split)
    big = max(sizes.values())
    odd = big + 5  # off the 16-element grid: no vector loads, masked tails
    heavy = ("eps+x0-stream", "loss+grad")
    heaviest = ("huber", "mask_inner")  # the most code per element: sqrt, division, mask index
    others = [D for D in sorted(sizes.values()) if D != big] + [odd]
    cases = [_philox_case(dt, 3 * 4096) for dt in DTYPES]
    for dt in DTYPES:
        cases += [_add_noise_case(dt, given, big) for given in (False, True)]
        cases += [_add_noise_case(dt, False, D) for D in others]
        # perturbed: every source of eps and xi at the large split, both streams elsewhere
        cases += [
            _add_noise_case(dt, given, big, xi)
            for given in (False, True)
            for xi in XI
            if XI[xi] is not None
        ]
        cases += [_add_noise_case(dt, False, D, "xi_stream") for D in others]
    for pt in DTYPES:
        cases += [_loss_case(pt, pt, t, m, big) for t in NOISE_TERMS for m in LOSS_MODES]
        cases += [_loss_case(pt, pt, *heavy, D) for D in others]
        # the kinds and masks: each pair with the heaviest terms and outputs; the heaviest
        # pair in the loss-only and gradient-only modes, with each term, and at every other
        # split
        cases += [
            _loss_case(pt, pt, *heavy, big, kind, mask)
            for kind in KINDS
            for mask in MASKS
            if (kind, mask) != ("l2", "nomask")
        ]
        cases += [_loss_case(pt, pt, heavy[0], m, big, *heaviest) for m in ("loss", "grad-goB")]
        cases += [
            _loss_case(pt, pt, t, heavy[1], big, *heaviest) for t in NOISE_TERMS if t != heavy[0]
        ]
        cases += [_loss_case(pt, pt, *heavy, D, *heaviest) for D in others]
        for nt in DTYPES:
            if nt != pt:
                cases += [
                    _loss_case(pt, nt, t, "loss+grad", big)
                    for t in NOISE_TERMS
                    if t.startswith("eps+x0")
                ]
    # knn: COUNT 1 and the largest COUNT of each configuration _tiles picks.
    for dt in ("fp32", "fp64"):
        groups = {}
        for count in range(1, knn.MAX_COUNT + 1):
            cfg = knn._tiles(count, DTYPES[dt], torch.device("cuda"))
            groups[tuple(sorted(cfg.items()))] = count
        counts = sorted({1, *groups.values()})
        cases += [_knn_case(dt, c, 64) for c in counts]
        cases.append(_knn_case(dt, knn.MAX_COUNT, 27))  # d off the 16-element grid
    return cases


def _triton_version() -> tuple[int, ...]:
    if not HAVE_TRITON:
        return ()
    version = importlib.metadata.version("triton")
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


# Known failures of older Tritons (seen with 3.6; 3.9 passes them), each with the fix it waits
# for: (test id pattern, reason). Not strict: a fixed kernel or a newer Triton just passes.
OLD_TRITON_FAILURES = [
    (
        r"^knn-fp64-count(16|64)-d64-sm(80|90)$",
        "Triton 3.6 (ptxas 12.8): 8-12 bytes of spills in the float64 _knn_pairs_kernel at 128 "
        "registers (8 warps; 4 warps spills more, 130-380 bytes, under 3.6 and 3.9 alike)",
    ),
    (
        r"^noise_loss-pred_fp64-noise_(fp64-eps\+x0-given-loss\+grad-D49152-sm90|"
        r"bf16-eps\+x0-given-loss\+grad-D49152-sm80)$",
        "Triton 3.6 (ptxas 12.8): 8-12 bytes of spills around the float64 division of the "
        "gradient scale in _noise_loss_kernel, once per program, not in the element loop",
    ),
]


def _marks(test_id: str) -> list:
    if _triton_version() >= (3, 9):
        return []
    return [
        pytest.mark.xfail(reason=reason, strict=False)
        for pattern, reason in OLD_TRITON_FAILURES
        if re.search(pattern, test_id)
    ]


CASES = _cases()
PARAMS = [
    pytest.param(case, cap, id=f"{case.id}-{target}", marks=_marks(f"{case.id}-{target}"))
    for case in CASES
    for target, cap in TARGETS.items()
]


# ---- the table ----------------------------------------------------------------------------


class Row(NamedTuple):
    kernel: str
    config: str
    target: str
    regs: int
    stack: int
    spills: int
    shared: int
    ok: str


@pytest.fixture(scope="session")
def table_rows():
    """Rows of every compiled case; the table is written at the end when every case ran."""
    done: dict[str, list[Row]] = {}  # rows by test id
    yield done
    if not PARAMS or len(done) != len(PARAMS):
        return
    path = Path(os.environ.get(TABLE_ENV) or TABLE)
    _write_table(path, [row for rows in done.values() for row in rows])


def _write_table(path: Path, rows: list[Row]) -> None:
    import triton

    body = [
        "| kernel | config | target | registers | stack (bytes) | spills (bytes) "
        "| shared (bytes) | ok |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r.kernel, r.config, r.target)):
        body.append(
            f"| {r.kernel} | {r.config} | {r.target} | {r.regs} | {r.stack} | {r.spills} "
            f"| {r.shared} | {r.ok} |"
        )
    limits = ", ".join(f"sm_{c}: {b}" for c, b in SHARED_LIMIT.items())
    command = " ".join(["pytest", *sys.argv[1:]])
    head = [
        "# Triton kernels compiled for sm_80 and sm_90",
        "",
        f"Triton {triton.__version__}, torch {torch.__version__}, `{command}`, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "One row per kernel, launcher configuration and target, compiled without a GPU "
        "(tests/test_gpu_compile.py says how the configurations are chosen). registers and "
        "stack: per thread (cuobjdump); spills: bytes of spill stores and loads in ptxas' log "
        "(read when there is a stack frame, which may also be a call's), which must be 0; "
        "shared: dynamic + static shared memory per block, at most the opt-in limit "
        f"({limits} bytes).",
        "",
    ]
    text = "\n".join(head + body) + "\n"
    # Only the header's date would change: keep the file as it is (no churn in git).
    if (
        path.is_file()
        and path.read_text().split("\n")[len(head) :] == text.split("\n")[len(head) :]
    ):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- the Triton test ----------------------------------------------------------------------


def _config(bound: dict, kwargs: dict, signature: dict, fixed: set[str]) -> str:
    """A call as the table shows it: constexprs and num_warps, then each pointer's element
    type, then the integer arguments Triton specialises on (== 1, multiple of 16) but for
    those in ``fixed`` (do_not_specialize)."""
    fields = []
    for key in sorted(kwargs):
        if key != "enable_fp_fusion" and signature.get(key) in ("constexpr", None):
            value = kwargs[key]
            fields.append(f"{key}={value.name if hasattr(value, 'primitive_bitwidth') else value}")
    pointers = [f"{n.removesuffix('_ptr')}:{t[1:]}" for n, t in signature.items() if t[0] == "*"]
    ints = [
        f"{n}={bound[n]}"
        for n, t in signature.items()
        if t in ("i32", "i64", "constexpr")
        and n not in kwargs
        and n not in fixed
        and isinstance(bound[n], int)
    ]
    return " ".join(fields + pointers + ints)


def _compile_case(case: Case, capability: int) -> dict:
    """Compiles every kernel that the case's launcher call launches: table rows and problems."""
    rows, problems = [], []
    for fn, args, kwargs in _launches(case.op, case.call):
        bound, signature, kernel, how = _compile(fn, args, kwargs, capability)
        res = _resources(kernel.asm["cubin"], fn.__name__)
        stack = res.get("STACK", 0) + res.get("LOCAL", 0)
        spills = _ptxas_spills(*how, kernel, capability) if stack else 0
        shared = kernel.metadata.shared + res.get("SHARED", 0)
        found = []
        if spills:
            found.append(f"{spills} bytes of spill stores and loads (registers: {res['REG']})")
        if shared > SHARED_LIMIT[capability]:
            found.append(f"{shared} bytes of shared memory > {SHARED_LIMIT[capability]}")
        found += _ptx_problems(fn.__name__, bound, kernel.asm["ptx"])
        fixed = {p.name for p in fn.params if p.do_not_specialize}
        config = _config(bound, kwargs, signature, fixed)
        ok = "no: " + "; ".join(found) if found else "yes"
        rows.append(
            [fn.__name__, config, f"sm_{capability}", res["REG"], stack, spills, shared, ok]
        )
        problems += [f"{fn.__name__} sm_{capability}: {p}" for p in found]
    return {"rows": rows, "problems": problems}


def _serve() -> None:
    """A compiling process: one JSON request a line in (case id, capability), one JSON answer
    a line out, in order. Kernels compile in processes of their own because the interpreter
    that the rest of the suite runs leaves triton.language patched after a host-side call of a
    kernel function, which breaks compilation in the same process."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Triton prints to stdout when ptxas fails: keep the answers' stream clean
    cases = {case.id: case for case in CASES}
    for line in sys.stdin:
        case_id, capability = json.loads(line)
        try:
            answer = _compile_case(cases[case_id], capability)
        except Exception:
            answer = {"error": traceback.format_exc()[-8000:]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class _Worker:
    """One compiling process (`python tests/test_gpu_compile.py --serve`) and the requests it
    has not answered yet, oldest first."""

    def __init__(self, workdir: Path):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONSAFEPATH"] = "1"  # the installed debias, not the source tree's
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=workdir,
            env=env,
        )
        self.pending: list[tuple[str, int]] = []

    def send(self, key: tuple[str, int]) -> None:
        self.pending.append(key)
        self.proc.stdin.write(json.dumps(key) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> tuple[tuple[str, int], dict | None]:
        """(the oldest request, its answer), or None for the answer if the process died."""
        line = self.proc.stdout.readline()
        return self.pending.pop(0), (json.loads(line) if line else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


class _Compiler:
    """Compiling processes, one per core (DEBIAS_GPU_COMPILE_JOBS sets the number), fed every
    selected case up front so that they compile while the tests read the answers in turn."""

    def __init__(self, workdir: Path, keys: list[tuple[str, int]]):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        jobs = int(os.environ.get("DEBIAS_GPU_COMPILE_JOBS") or cores or 1)
        self.workdir = workdir
        self.workers = [_Worker(workdir) for _ in range(max(1, min(jobs, len(keys))))]
        self.owner: dict[tuple[str, int], _Worker] = {}
        self.answers: dict[tuple[str, int], dict] = {}
        for i, key in enumerate(keys):
            self._send(key, self.workers[i % len(self.workers)])

    def _send(self, key, worker) -> None:
        self.owner[key] = worker
        worker.send(key)

    def __call__(self, case_id: str, capability: int) -> dict:
        key = (case_id, capability)
        if key not in self.owner and key not in self.answers:
            self._send(key, self.workers[0])
        while key not in self.answers:
            worker = self.owner[key]
            done, answer = worker.receive()
            if answer is None:  # it died on `done`: the others go to a new process
                code = worker.proc.wait()
                answer = {"error": f"the compiling process died (exit code {code}) on {done}"}
                fresh = _Worker(self.workdir)
                self.workers[self.workers.index(worker)] = fresh
                for left in list(worker.pending):
                    self._send(left, fresh)
            self.answers[done] = answer
        return self.answers.pop(key)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


@pytest.fixture(scope="session")
def compiler(request, tmp_path_factory):
    """The compiling processes, given the selected Triton cases in the order they run."""
    keys = [
        (item.callspec.params["case"].id, item.callspec.params["capability"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_triton_kernel_compiles"
        and item.callspec.params["case"] is not None
    ]
    run = _Compiler(tmp_path_factory.mktemp("gpu_compile"), keys)
    yield run
    run.close()


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton (with its NVIDIA backend) is not installed")
@pytest.mark.parametrize(("case", "capability"), PARAMS or [pytest.param(None, 0, id="none")])
def test_triton_kernel_compiles(case, capability, compiler, table_rows):
    """The case compiles for the target without spills, within the shared-memory limit, and
    its PTX has the instructions the kernel is written for."""
    answer = compiler(case.id, capability)
    key = f"{case.id}-{capability}"
    if "error" in answer:
        table_rows[key] = [Row(case.op, case.id, f"sm_{capability}", 0, 0, 0, 0, "no: error")]
        pytest.fail(f"{case.id} sm_{capability} does not compile:\n{answer['error']}")
    table_rows[key] = [Row(*row) for row in answer["rows"]]
    assert not answer["problems"], f"{case.id}: " + "; ".join(answer["problems"])


def _ptx_problems(name: str, bound: dict, ptx: str) -> list[str]:
    """What the PTX lacks or has that the kernel is written against."""
    problems = []
    if name in ("_add_noise_kernel", "_noise_loss_kernel", "_philox_fill_kernel"):
        size = bound.get("D", bound.get("n"))
        if bound["TILE"] == 1024 and isinstance(size, int) and size % 16 == 0:
            # 16-byte loads and stores of the bulk data when D is a multiple of 16 (bf16 and
            # fp16: v4 of packed pairs; fp64: v2); philox_fill only stores.
            want = ("st",) if name == "_philox_fill_kernel" else ("ld",)
            if name == "_add_noise_kernel" or bound.get("GRAD"):
                want += ("st",)
            for op in want:
                if 16 not in _vector_bytes(ptx, op):
                    problems.append(f"no 16-byte {op}.global vectors")
        # Launched with fp fusion off: every product and sum rounds on its own. Only the
        # Philox stream's polynomials call tl.fma, as csrc/philox.h does (eps's, or xi's).
        stream = (
            name == "_philox_fill_kernel"
            or (not bound.get("HAS_NOISE") and bound.get("TERMS", 1) & 1)
            or (bound.get("PERTURBED") and not bound.get("HAS_XI"))
        )
        if not stream and re.search(r"\bfma\.", ptx):
            problems.append("fma in the PTX of a kernel without the stream (fp fusion is off)")
        if name == "_noise_loss_kernel" and bound.get("KIND") == 2 and bound.get("GRAD"):
            # the pseudo-Huber gradient's sqrt and division are IEEE (the same bits as C++)
            for op in ("sqrt", "div"):
                if not re.search(rf"\b{op}\.rn\.f(32|64)\b", ptx):
                    problems.append(f"no {op}.rn in the pseudo-Huber gradient")
                if re.search(rf"\b{op}\.approx\.", ptx):
                    problems.append(f"{op}.approx in the pseudo-Huber kernel")
    if name in ("_knn_keys_kernel", "_knn_pairs_kernel"):
        want = ".f32.tf32.tf32" if name == "_knn_keys_kernel" else ".f64.f64.f64.f64"
        found = set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx))
        if not any(want in i for i in found):
            problems.append(f"no tensor-core product with {want} (found {sorted(found)})")
        if re.search(r"\bfma\.", ptx):
            problems.append("fma in the scores' PTX (fp fusion is off)")
    return problems


# ---- CUDA sources -------------------------------------------------------------------------

NVCC = shutil.which("nvcc")
GENCODE = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90")


def _build_module():
    """debias/_build.py by path (standard library only): the one list of sources and flags."""
    spec = importlib.util.spec_from_file_location(
        "_debias_build_flags", ROOT / "debias" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()
# The CUDA build's sources as the build lists them, relative to the root: .cu kernels and the
# torch-facing .cpp glue of csrc/cuda/.
CUDA_SOURCES = [os.path.relpath(p, ROOT) for p in BUILD.cuda_sources(ROOT / "csrc")]


def _cuda_include() -> str:
    """The CUDA headers' folder of the nvcc on PATH (nvcc may be a wrapper script)."""
    out = subprocess.run(
        [NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True
    )
    for line in (out.stdout + out.stderr).splitlines():
        match = re.search(r'INCLUDES="-I([^"]+)"', line)
        if match:
            return match.group(1).strip()
    return str(Path(NVCC).resolve().parent.parent / "include")


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")


@needs_nvcc
@pytest.mark.parametrize("source", [s for s in CUDA_SOURCES if s.endswith(".cu")])
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    """Plain nvcc with the build's NVCC_FLAGS, no torch headers (the kernels take raw pointers
    and a stream)."""
    out = str(tmp_path / (Path(source).name + ".o"))
    cmd = [NVCC, *BUILD.NVCC_FLAGS, "-Icsrc", *GENCODE, "-c", source, "-o", out]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, " ".join(cmd) + "\n" + run.stderr[-4000:]


@needs_nvcc
@pytest.mark.parametrize("source", [s for s in CUDA_SOURCES if s.endswith(".cpp")])
def test_cuda_glue_compiles_against_torch(source, tmp_path):
    """The torch-facing glue, with the C++ flags and the CUDA define of an ahead-of-time
    build, against the installed torch's headers and nvcc's CUDA headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    torch_inc = include_paths()
    defines = [BUILD.CUDA_DEFINE]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / generated).is_file() for p in torch_inc):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU build of torch
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        cxx,
        *BUILD.CXX_FLAGS,
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *defines,
        *[f"-I{p}" for p in torch_inc],
        f"-I{_cuda_include()}",
        "-Icsrc",
        "-c",
        source,
        "-o",
        str(tmp_path / (Path(source).name + ".o")),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, " ".join(cmd) + "\n" + run.stderr[-4000:]


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
