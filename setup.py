"""Builds the optional C++ extension ``ternlm._C`` (everything else lives in pyproject.toml).

The extension needs no torch headers and no -march flag: each instruction set's kernels carry
their own target attribute and are picked at run time, so one build runs on any x86-64 (other
architectures get the portable scalar kernels). ``optional=True`` lets installation succeed
without a working compiler -- ternlm then runs the pure-PyTorch reference kernels and says so.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            compile_args, link_args = ["/O2", "/std:c++17"], []
        else:
            # -ffp-contract=off: no silent FMA fusion, so the float epilogue matches the reference.
            compile_args = ["-O3", "-std=c++17", "-pthread", "-ffp-contract=off", "-fno-math-errno",
                            "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
            link_args = ["-pthread"]
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "ternlm._C",
            sources=["csrc/ternary_kernels.cpp"],
            depends=["csrc/isa_common.inc", "csrc/isa_avx2.inc", "csrc/isa_avx512.inc", "csrc/int8_gemv.inc", "csrc/attn_decode.inc",
                     "csrc/decode_step.inc"],
            include_dirs=["csrc"],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
