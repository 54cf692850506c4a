"""Build the one native extension, ``accelprune._native``, from ``csrc/``.

OpenMP is used when the compiler accepts ``-fopenmp``; otherwise the extension
is built serial (same results, one thread).
"""
import os
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(compiler, flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        use_openmp = os.environ.get("ACCELPRUNE_NO_OPENMP") != "1" and _compiler_accepts(
            self.compiler, "-fopenmp"
        )
        for ext in self.extensions:
            # -ffp-contract=off: no fused multiply-adds, so results do not depend on the CPU;
            # -fno-math-errno: lets sqrt vectorise (errno is never read).
            ext.extra_compile_args += ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]
            if use_openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


setup(
    ext_modules=[
        Pybind11Extension(
            "accelprune._native",
            ["csrc/bindings.cpp"],
            include_dirs=["csrc"],
            depends=["csrc/ward.hpp"],  # rebuild when the header changes
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
