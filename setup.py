"""The build of the native data path; everything else is in setup.cfg.

The extension is optional: where it cannot be compiled (no compiler or Python headers) the
install still succeeds and tcpencap runs its Python data path, saying so in its log."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tcpencap.native._fastpath",
            ["tcpencap/native/fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
