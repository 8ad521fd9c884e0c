"""The package's import graph follows a declared layering, lowest first, and has no cycles.

Every import of an omni2sound module counts, at module level and inside functions (a lazy import is still a
dependency), read statically with ``ast``. A module may import modules of its own layer or of a lower one, never a
higher one; a module in no layer fails the test, so a new module gets placed. The Triton kernels' sources live in
``kernels/omni2sound_kernels/`` and are read as ``omni2sound.kernels``.
"""
import ast
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A new module goes into the lowest layer that holds everything it imports (patterns: fnmatch).
LAYERS: List[Tuple[str, Sequence[str]]] = [
    # the compiled extension, its access layer, the Triton kernels
    ("kernels", ["omni2sound._C", "omni2sound._native", "omni2sound.kernels", "omni2sound.kernels.*"]),
    # the single dispatch point of every fused op
    ("ops", ["omni2sound.ops", "omni2sound.ops.*"]),
    # shared utilities with no model in them: devices, atomic files, media I/O, CUDA graphs, run folders, logs
    ("support", ["omni2sound.device", "omni2sound.gpu_info", "omni2sound.files", "omni2sound.audio",
                 "omni2sound.video", "omni2sound.mux", "omni2sound.cuda_graphs", "omni2sound.runs",
                 "omni2sound.tblog", "omni2sound.optim"]),
    # the paper's pieces: conditions, flow matching, the DiT, the VAE, encoders, data, the synthetic world
    ("model", ["omni2sound.conditions", "omni2sound.flow", "omni2sound.model", "omni2sound.sampling",
               "omni2sound.vae", "omni2sound.vae_forms", "omni2sound.vae_loss", "omni2sound.vae_gan",
               "omni2sound.encoders", "omni2sound.synchformer", "omni2sound.encoder_spec", "omni2sound.data",
               "omni2sound.data.*", "omni2sound.toy"]),
    # what runs the model: the sampling pipeline, the training loop and steps
    ("pipeline", ["omni2sound.pipeline", "omni2sound.serving", "omni2sound.trainer", "omni2sound.graphed_step",
                  "omni2sound.vae_train"]),
    # the package's public names (``from omni2sound import Omni2SoundPipeline``), loaded on first use
    ("api", ["omni2sound"]),
    # command-line programs and the jobs behind them (the training schedule, extraction, the toy oracle)
    ("cli", ["omni2sound.train", "omni2sound.schedule", "omni2sound.generate", "omni2sound.batch", "omni2sound.extract",
             "omni2sound.oracle", "omni2sound.evaluate", "omni2sound.evaluation", "omni2sound.evaluation.*",
             "omni2sound.atlas", "omni2sound.atlas.*", "omni2sound.demo"]),
]

# Source folders and the package name each installs as (setup.py's package_dir).
SOURCES = {"omni2sound": ROOT / "omni2sound", "omni2sound.kernels": ROOT / "kernels" / "omni2sound_kernels"}


def module_files(sources: Dict[str, Path]) -> Dict[str, Path]:
    """Module name -> source file, for every .py under each source folder (packages by their __init__.py)."""
    out = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    # a compiled extension has no source to read, but is a module others import
    for package, folder in sources.items():
        for path in folder.glob("_C*.so"):
            out.setdefault(f"{package}._C", path)
    return out


def imports_of(name: str, path: Path, known: set, top: str) -> List[Tuple[str, int]]:
    """(imported module, line) for every import of a ``top`` module in the file, module level and in functions.
    ``from a import b`` counts as an import of ``a.b`` when that is a module, else of ``a``."""
    if path.suffix != ".py":
        return []
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                if node.module:
                    base += node.module.split(".")
                module = ".".join(base)
            else:
                module = node.module or ""
            if module.split(".")[0] != top:
                continue
            for a in node.names:
                sub = f"{module}.{a.name}"
                out.append((sub if sub in known else module, node.lineno))
    return out


def layer_of(name: str, layers) -> int:
    for i, (_, patterns) in enumerate(layers):
        if any(fnmatchcase(name, p) for p in patterns):
            return i
    return -1


def check_layering(sources: Dict[str, Path], layers, root: Path, table: str) -> List[str]:
    """Every problem found: modules in no layer, imports of a higher layer, import cycles."""
    files = module_files(sources)
    top = next(iter(sources)).split(".")[0]
    known = set(files)
    problems = []
    graph: Dict[str, set] = {m: set() for m in files}
    for name, path in files.items():
        rel = path.relative_to(root)
        layer = layer_of(name, layers)
        if layer < 0:
            problems.append(f"{rel}: module {name} is in no layer; declare it in LAYERS of {table}, in the lowest "
                            f"layer that holds everything it imports ({', '.join(n for n, _ in layers)})")
            continue
        for target, line in imports_of(name, path, known, top):
            if target not in known:     # a module still to be written (or an optional one): no edge to check
                continue
            if target != name:
                graph[name].add(target)
            t_layer = layer_of(target, layers)
            if t_layer > layer:
                problems.append(f"{rel}:{line}: {name} (layer {layers[layer][0]}) imports {target} (layer "
                                f"{layers[t_layer][0]}, higher): move the shared code down, or the module up")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: Dict[str, set]) -> List[List[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(_cycle_in(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_in(component: List[str], graph: Dict[str, set]) -> List[str]:
    """A path start -> ... -> start inside the component (breadth-first from its first module)."""
    members, start = set(component), component[0]
    parent = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return component


def test_package_follows_its_layering():
    problems = check_layering(SOURCES, LAYERS, ROOT, "tests/test_layering.py")
    assert not problems, "\n".join(problems)


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


SYNTHETIC_LAYERS = [("low", ["pkg", "pkg.low", "pkg.sub", "pkg.sub.*"]), ("high", ["pkg.high"])]
CLEAN = {"pkg/__init__.py": "", "pkg/low.py": "import os\n", "pkg/sub/__init__.py": "from . import a\n",
         "pkg/sub/a.py": "from ..low import x\n", "pkg/high.py": "from .low import x\nfrom pkg.sub import a\n"}


def _check(tmp_path, files):
    _write(tmp_path, files)
    return check_layering({"pkg": tmp_path / "pkg"}, SYNTHETIC_LAYERS, tmp_path, "the table")


def test_layering_check_passes_a_clean_tree(tmp_path):
    assert _check(tmp_path, CLEAN) == []


@pytest.mark.parametrize("back_edge", [
    "from .high import y\n",                                   # module level, relative
    "def f():\n    import pkg.high\n    return pkg.high\n",    # inside a function, absolute
    "def f():\n    from pkg import high\n",                     # a submodule named in from-import
])
def test_layering_check_fails_on_a_back_edge(tmp_path, back_edge):
    problems = _check(tmp_path, {**CLEAN, "pkg/low.py": back_edge})
    assert any("pkg.low (layer low) imports pkg.high (layer high, higher)" in p and p.startswith("pkg/low.py:")
               for p in problems), problems


def test_layering_check_fails_on_a_cycle_within_a_layer(tmp_path):
    problems = _check(tmp_path, {**CLEAN, "pkg/low.py": "def f():\n    from .sub import a\n"})
    assert problems == ["import cycle: pkg.low -> pkg.sub.a -> pkg.low"], problems


def test_layering_check_fails_on_a_module_in_no_layer(tmp_path):
    problems = _check(tmp_path, {**CLEAN, "pkg/extra.py": "import os\n"})
    assert len(problems) == 1 and problems[0].startswith("pkg/extra.py: module pkg.extra is in no layer; declare "
                                                         "it in LAYERS of the table"), problems
