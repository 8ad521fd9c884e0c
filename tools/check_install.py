"""Checks an installed omni2sound from outside the source tree: every module of the installed package imports, and
the command-line entry points answer ``--help`` and run the smoke preset.

Run it with the interpreter of the environment under test, from a folder that is not the repository (CI does this
for a wheel installed into a fresh virtual environment and for ``pip install .``)::

    cd "$(mktemp -d)" && python /path/to/repo/tools/check_install.py [--smoke]

A module the package ships but a wheel leaves out (a subpackage missing from the build) fails here with the
ModuleNotFoundError a user would meet.
"""
import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

COMMANDS = ("train", "generate", "extract", "evaluate", "atlas", "demo")


def installed_modules(package) -> list[str]:
    """Every module under ``package`` as installed: its folder walked on disk, so a file the wheel dropped is
    missing here too, and every subpackage reached from it is walked in turn."""
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        names.append(info.name)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="also run `python -m omni2sound.train --preset smoke`")
    args = ap.parse_args()

    repo = Path(__file__).resolve().parent.parent
    if Path.cwd().resolve() == repo or repo in Path.cwd().resolve().parents:
        print(f"run this from outside the repository ({repo}), or Python imports the source tree", file=sys.stderr)
        return 2
    # Triton kernel modules are importable only where triton is; on a CPU they need the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import omni2sound

    where = Path(omni2sound.__file__).resolve().parent
    if repo in where.parents or where == repo / "omni2sound":
        print(f"omni2sound imported from the source tree ({where}), not from an installed copy", file=sys.stderr)
        return 2
    names = installed_modules(omni2sound)
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the check fails
            failed.append(f"{name}: {type(e).__name__}: {e}")
    # every Triton kernel module of the source tree (kernels/omni2sound_kernels/) is in the installed package
    kernel_sources = repo / "kernels" / "omni2sound_kernels"
    kernels = [f"omni2sound.kernels.{p.stem}" for p in sorted(kernel_sources.glob("*.py")) if p.stem != "__init__"]
    for required in ("omni2sound._C", "omni2sound.kernels", "omni2sound.data", "omni2sound.ops", *kernels):
        if required not in sys.modules:
            failed.append(f"{required}: not found in the installed package")
    print(f"[check_install] {len(names)} modules under {where}")
    if failed:
        print("[check_install] modules that do not import:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1

    for cmd in COMMANDS:
        r = subprocess.run([sys.executable, "-m", f"omni2sound.{cmd}", "--help"], capture_output=True, text=True)
        if r.returncode != 0 or "usage" not in r.stdout.lower():
            print(f"[check_install] omni2sound.{cmd} --help failed (rc {r.returncode}):\n{r.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
    print(f"[check_install] --help of {', '.join(COMMANDS)}: ok")

    if args.smoke:
        with tempfile.TemporaryDirectory() as runs:
            r = subprocess.run([sys.executable, "-m", "omni2sound.train", "--preset", "smoke", "--runs-dir", runs])
            if r.returncode != 0:
                print(f"[check_install] the smoke run failed (rc {r.returncode})", file=sys.stderr)
                return 1
        print("[check_install] train --preset smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
