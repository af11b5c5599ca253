"""Build the native core; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

#: The parts of the native core, one idea each (src/shmcast/_csrc/module.c says which).
SOURCES = ("module", "atomics", "cursor", "guard", "crc32c", "probe", "load", "lease", "sockwake",
           "uring")

setup(
    ext_modules=[
        Extension(
            "shmcast._native",
            sources=[f"src/shmcast/_csrc/{name}.c" for name in SOURCES],
            depends=["src/shmcast/_csrc/native.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
