"""Build driver: setuptools only hands the work to CMake (Ninja generator).

Environment knobs:
  PGEST_CUDA=AUTO|ON|OFF        build the CUDA kernels (AUTO: when nvcc is found)
  PGEST_CUDA_ARCHS="80;90"      CUDA architectures (PTX of the last one is embedded too)
  PGEST_BUILD_TYPE=Release      CMake build type
  PGEST_ASAN=ON                 AddressSanitizer build of the CPU kernels (tests only)
  MAX_JOBS=N                    parallel compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("PGEST_BUILD_TYPE", "Debug" if self.debug else "Release")
        args = [
            "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPGEST_CUDA={os.environ.get('PGEST_CUDA', 'AUTO')}",
        ]
        try:  # the ninja wheel of an isolated build is not always on PATH
            import ninja

            args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        except ImportError:
            pass
        # Always explicit: a reused build directory's CMake cache would keep an
        # earlier PGEST_ASAN=ON build's sanitizer in a later plain build.
        asan = os.environ.get("PGEST_ASAN", "OFF").upper() in ("1", "ON", "TRUE")
        args.append(f"-DPGEST_ASAN={'ON' if asan else 'OFF'}")
        if "PGEST_CUDA_ARCHS" in os.environ:
            args.append(f"-DPGEST_CUDA_ARCHS={os.environ['PGEST_CUDA_ARCHS']}")

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("pgest._C")], cmdclass={"build_ext": CMakeBuild})
