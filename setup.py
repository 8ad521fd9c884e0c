"""Builds omni2sound and its native extension (omni2sound._C) through CMake.

Environment knobs: OMNI2SOUND_CUDA_ARCHS, OMNI2SOUND_SKIP_CUDA=1, OMNI2SOUND_CPU_ARCH (see CMakeLists.txt),
OMNI2SOUND_BUILD_JOBS (parallel compile jobs, default: CPU count).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("OMNI2SOUND_SKIP_CUDA", "0") not in ("", "0"):
            args.append("-DOMNI2SOUND_SKIP_CUDA=ON")
        for var in ("OMNI2SOUND_CUDA_ARCHS", "OMNI2SOUND_CPU_ARCH"):
            if os.environ.get(var):
                args.append(f"-D{var}={os.environ[var]}")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("OMNI2SOUND_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir)


# Packages are found, never listed: a subpackage added later ships without anyone editing this file. The Triton
# kernels live in kernels/omni2sound_kernels/ and install as omni2sound.kernels (kernels/ itself has no __init__.py,
# so from the repository root it cannot shadow PyPI's `kernels`, which transformers imports).
KERNELS_DIR = "kernels/omni2sound_kernels"
PACKAGES = find_packages(include=["omni2sound", "omni2sound.*"]) + [
    "omni2sound.kernels" + ("." + p if p else "") for p in ["", *find_packages(KERNELS_DIR)]
]

setup(
    packages=PACKAGES,
    package_dir={"omni2sound": "omni2sound", "omni2sound.kernels": KERNELS_DIR},
    ext_modules=[CMakeExtension("omni2sound._C")],
    cmdclass={"build_ext": CMakeBuild},
)
