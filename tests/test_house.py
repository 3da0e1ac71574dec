"""The house's rules, checked on the source: the core imports torch and numpy only, data flows
one way (no core module imports the pipeline; each layer of LAYERS imports only from its own and
those below), and no private name crosses a module boundary.

What counts as private, and where it may go:

- A private name (``_name``, not a dunder) belongs to its module: ``from debias.x import _name``
  and ``x._name`` on an imported debias module are refused everywhere in debias/ except in the
  module that defines it (a package's own ``__init__`` counts as a separate module).
- A private module (``debias._build``, ``debias.ops._backend``) is the core's own: any core
  module may import it and use its public names. The pipeline uses the core through its public
  modules only (``debias.checks``, the one home of the argument checks and their message format,
  is public: the command line relies on it to name the flag behind an error).
- The tests are not scanned: they may look inside.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import debias

PACKAGE = Path(debias.__file__).resolve().parent
PIPELINE = "debias.pipeline"
# What a core call must not import: the pipeline's dependencies, and the pipeline itself.
FORBIDDEN = ("matplotlib", "PIL", "sklearn", "safetensors", "tqdm", PIPELINE)


def _modules() -> dict[str, Path]:
    """Every Python module of the package, by dotted name (the Triton kernels included)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_core(module: str) -> bool:
    return module != PIPELINE and not module.startswith(PIPELINE + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(module: str) -> bool:
    return any(_private(part) for part in module.split("."))


@dataclass(frozen=True)
class Offence:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}: {self.what}"


class _Scan(ast.NodeVisitor):
    """One module's imports of debias modules and names, and the attributes it reads on them."""

    def __init__(self, module: str, path: Path) -> None:
        self.module, self.path = module, path
        self.is_package = path.name == "__init__.py"
        self.imports: list[tuple[int, str]] = []  # (line, debias module imported from)
        self.private_names: list[Offence] = []
        self.bound: dict[str, str] = {}  # local name -> the debias module it is bound to

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self.module.split(".")
        base = package if self.is_package else package[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "debias" or alias.name.startswith("debias."):
                self.imports.append((node.lineno, alias.name))
                if alias.asname:
                    self.bound[alias.asname] = alias.name
                else:
                    self.bound["debias"] = "debias"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self._absolute(node)
        if not (source == "debias" or source.startswith("debias.")):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:  # a module imported from its package
                self.imports.append((node.lineno, full))
                self.bound[alias.asname or alias.name] = full
                continue
            self.imports.append((node.lineno, source))
            if _private(alias.name) and source != self.module:
                self.private_names.append(
                    Offence(self.path, node.lineno, f"imports {alias.name} from {source}")
                )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self._module_of(node.value)
        if owner is not None:
            full = f"{owner}.{node.attr}"
            if full not in MODULES and _private(node.attr) and owner != self.module:
                self.private_names.append(
                    Offence(self.path, node.lineno, f"reads {node.attr} of {owner}")
                )
        self.generic_visit(node)

    def _module_of(self, node: ast.AST) -> str | None:
        """The debias module an expression names (``knn``, ``debias.ops.knn``), else None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self._module_of(node.value)
            if owner is not None and f"{owner}.{node.attr}" in MODULES:
                return f"{owner}.{node.attr}"
        return None


def _scan(module: str) -> _Scan:
    path = MODULES[module]
    scan = _Scan(module, path)
    scan.visit(ast.parse(path.read_text(), str(path)))
    return scan


SCANS = {module: _scan(module) for module in MODULES}


def _report(offences: list[Offence], rule: str) -> str:
    lines = "\n".join(f"  {o}" for o in offences)
    return f"{len(offences)} offence(s) against '{rule}':\n{lines}"


def test_the_scan_sees_the_package():
    assert {"debias", "debias.ops.knn", "debias.memorization", "debias.pipeline.cli"} <= set(
        MODULES
    )
    assert any(m == "debias.ops.knn" for _, m in SCANS["debias"].imports)


def test_no_private_name_crosses_a_module_boundary():
    offences = [o for scan in SCANS.values() for o in scan.private_names]
    assert not offences, _report(offences, "no private name crosses a module boundary")


def test_no_core_module_imports_the_pipeline():
    offences = [
        Offence(scan.path, line, f"imports {source}")
        for module, scan in SCANS.items()
        if _is_core(module)
        for line, source in scan.imports
        if not _is_core(source)
    ]
    assert not offences, _report(offences, "the core never imports the pipeline")


# Data flows one way (DESIGN, the house): each module imports only from its own layer or those
# below. debias.triton_kernels (the kernels, installed into the package) sits with the helpers:
# kernels take tensors and scalars and know nothing of the layers above.
LAYERS = (
    ("debias.checks", "debias._build", "debias.reference", "debias.triton_kernels"),
    ("debias.schedules",),
    ("debias.weighting",),
    ("debias.ops",),
    ("debias.memorization",),
    ("debias", "debias.info"),
    (PIPELINE,),
)


def _layer(module: str) -> int:
    """The layer of a module: that of the longest name in LAYERS it is, or lies inside."""
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or module.startswith(name + ".")
            if inside and len(name) > best:
                best, layer = len(name), i
    assert layer is not None, f"{module} is in no layer of LAYERS: place it there"
    return layer


def test_data_flows_one_way():
    offences = [
        Offence(scan.path, line, f"imports {source} (a layer above {module})")
        for module, scan in SCANS.items()
        for line, source in scan.imports
        if _layer(source) > _layer(module)
    ]
    assert not offences, _report(offences, "data flows one way, no arrow runs up")


def test_the_pipeline_uses_public_core_modules():
    offences = [
        Offence(scan.path, line, f"imports the private module {source}")
        for module, scan in SCANS.items()
        if not _is_core(module)
        for line, source in scan.imports
        if _is_core(source) and _private_module(source)
    ]
    assert not offences, _report(offences, "the pipeline uses the core's public modules")


# ---- the core imports torch and numpy only ------------------------------------------------

CORE_CALLS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch

    before = set(sys.modules)  # torch itself imports tqdm where it is installed (torch.hub)
    import debias
    from debias import memorization as M

    g = torch.Generator().manual_seed(0)
    sched = debias.NoiseSchedule.linear(50)
    x0 = torch.randn(3, 1, 4, 4, generator=g)
    t = debias.sample_timesteps(3, sched, generator=g)
    x_t, noise = debias.add_noise(x0, t, sched)
    pred = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    debias.fused_loss(pred, noise, t, sched, weighting="debias").backward()
    debias.loss_weight(t, sched, "debias")
    debias.weight_table(sched, "debias")
    flow = debias.NoiseSchedule.flow_matching(50, shift=3.0)
    t = debias.sample_timesteps(3, flow, "logit_normal", generator=g)
    x_t, noise = debias.add_noise(x0, t, flow, generator=g)
    debias.fused_loss(pred, noise, t, flow, weighting="debias", x0=x0).backward()
    train = torch.randn(20, 1, 4, 4, generator=g)
    samples = torch.cat([train[:2] + 1e-3, torch.randn(4, 1, 4, 4, generator=g)])
    debias.knn(samples, train, 2)
    debias.knn(samples, train.numpy(), 1, "cosine")
    np.save(sys.argv[1], train.numpy())
    debias.knn(samples, sys.argv[1], 1)
    nb = M.nearest_distances(samples, train, 2)
    M.gu_ratio(nb, resamples=10)
    M.carlini_extraction(nb, resamples=10)
    M.somepalli_similarity(samples, sys.argv[1])
    M.extract_features(samples, lambda b: b.flatten(1)[:, :5], batch_size=4)
    M.memorization_report(samples, train, samples_b=samples, train_b=train, resamples=10)
    M.biased_generalization(samples, samples, train, train)
    # diffusers-like schedulers (diffusers itself imports PIL, safetensors and tqdm)
    class DDPMScheduler:
        config = {"num_train_timesteps": 50, "prediction_type": "v_prediction"}
        alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50), 0)

    class FlowMatchEulerDiscreteScheduler:
        config = {"num_train_timesteps": 50}
        sigmas = torch.linspace(1.0, 0.02, 50)
        timesteps = sigmas * 1000

    for scheduler in (DDPMScheduler(), FlowMatchEulerDiscreteScheduler()):
        t = debias.sample_timesteps(3, scheduler, generator=g)
        x_t, noise = debias.add_noise(x0, t, scheduler)
        debias.fused_loss(pred, noise, t, scheduler, x0=x0).backward()
    forbidden = {FORBIDDEN!r}
    new = set(sys.modules) - before
    loaded = [m for m in new if any(m == f or m.startswith(f + ".") for f in forbidden)]
    print(" ".join(sorted(loaded)))
    """
)


def test_core_calls_import_torch_and_numpy_only(tmp_path):
    """`import debias` and a call of every core function in a fresh Python: none of the
    pipeline's dependencies, nor the pipeline, is imported beyond what `import torch` and
    `import numpy` themselves import."""
    if not hasattr(debias.NoiseSchedule, "from_diffusers"):
        pytest.fail("NoiseSchedule.from_diffusers is gone: update the calls above")
    code = CORE_CALLS.replace("{FORBIDDEN!r}", repr(set(FORBIDDEN)))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "train.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [], f"the core imported {out.stdout.split()}"


def test_knn_progress_takes_a_callable_bar():
    """The core draws no bar of its own by default; a callable wraps the chunks (the pipeline's
    own bar, or any other)."""
    import torch

    seen = []

    def bar(chunks):
        for start, chunk in chunks:
            seen.append(start)
            yield start, chunk

    queries = torch.randn(5, 3, dtype=torch.float64)
    database = [torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)]
    _, index = debias.knn(queries, database, 1, progress=bar)
    assert seen == [0, 4] and index.shape == (5, 1)


def test_architecture_names_files_that_exist():
    """ARCHITECTURE.md draws the house by its files: each path it names exists, from the
    repository root or, without a root (`schedules.py`, `ops/knn.py`), in the package
    (``<op>`` stands for every op: noise_loss and knn)."""
    root = Path(__file__).resolve().parents[1]  # the repository (the package may be installed)
    text = (root / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"(?<![\w/.<>-])([\w<>/]+\.(?:py|h|cpp|cu|cuh|md|sh))\b", text))
    missing = [
        path
        for name in sorted(named)
        for path in [name.replace("<op>", op) for op in ("noise_loss", "knn")]
        if not any((root / base / path).exists() for base in ("", "debias", "debias/pipeline"))
    ]
    assert len(named) > 15, f"the scan found too few paths: {sorted(named)}"
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"
