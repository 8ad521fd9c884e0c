"""The repository's layout: the Triton kernels' folder and the installed package's names.

From the repository root (where ``python -m pytest`` and ``python -m omni2sound.train`` run, with the root on
sys.path) the top-level name ``kernels`` must be PyPI's package (transformers imports it when it loads a model),
never the repository's ``kernels/`` folder, and every module of ``kernels/omni2sound_kernels/`` must import as
``omni2sound.kernels.<module>`` from the install. This file checks the editable install the tests run in;
``tools/check_install.py`` (run by CI on a wheel in a fresh environment) checks the wheel side.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = ROOT / "kernels" / "omni2sound_kernels"


def test_repository_kernels_folder_does_not_shadow_pypi_kernels():
    # The top-level name must reach PyPI's package (or fail as missing), never our folder.
    code = ("import importlib.util, os, sys\n"
            "try:\n    import kernels\nexcept ImportError:\n    print('missing'); sys.exit(0)\n"
            "f = getattr(kernels, '__file__', None)\n"
            "print(os.path.dirname(os.path.abspath(f)) if f else 'namespace:' + os.pathsep.join(kernels.__path__))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    where = out.stdout.strip()
    assert where != str(ROOT / "kernels"), "the repository's kernels/ shadows PyPI's kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes kernels/ a regular package " \
        "that shadows PyPI's kernels from the repository root"
    pypi = importlib.util.find_spec("kernels") is not None and where != "missing" \
        and not where.startswith("namespace:")
    if pypi:
        subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT, check=True)


def test_every_kernel_module_imports_as_omni2sound_kernels_from_the_install(tmp_path):
    modules = sorted(p.stem for p in KERNEL_SOURCES.glob("*.py") if p.stem != "__init__")
    assert modules, f"no kernel modules found in {KERNEL_SOURCES}"
    # from outside the tree (only the install's finder can resolve the names) and from the root (the root on
    # sys.path must not change what they resolve to); TRITON_INTERPRET lets triton import without a GPU
    code = ("import importlib, os, sys\n"
            "os.environ.setdefault('TRITON_INTERPRET', '1')\n"
            f"for m in {modules!r}:\n"
            "    mod = importlib.import_module('omni2sound.kernels.' + m)\n"
            "    print(os.path.realpath(mod.__file__))\n")
    for cwd in (tmp_path, ROOT):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
        assert out.returncode == 0, f"from {cwd}: {out.stderr[-2000:]}"
        files = out.stdout.split()
        assert files == [str((KERNEL_SOURCES / f"{m}.py").resolve()) for m in modules], files
