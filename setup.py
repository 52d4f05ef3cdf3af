"""The build of the native data path; everything else is in setup.cfg.

The extension is optional: where it cannot be compiled (no compiler or Python headers) the
install still succeeds and tcpencap runs its Python data path, saying so in its log."""

from pathlib import Path

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tcpencap.native._fastpath",
            ["tcpencap/native/fastpath.c"],  # includes its parts, tcpencap/native/src/
            depends=sorted(str(p) for p in Path("tcpencap/native/src").glob("*.[ch]")),
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
