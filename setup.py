"""The build of the native data path; everything else is in setup.cfg.

The extension is optional: where it cannot be compiled (no compiler or Python headers) the
install still succeeds and tcpencap runs its Python data path, saying so in its log."""

from pathlib import Path

from setuptools import Extension, setup

PARTS = Path("tcpencap/native/src")

setup(
    ext_modules=[
        Extension(
            "tcpencap.native._fastpath",
            # the module definition, then each part: a compilation unit with its own header
            ["tcpencap/native/fastpath.c", *sorted(str(p) for p in PARTS.glob("*.c"))],
            depends=sorted(str(p) for p in PARTS.glob("*.h")),
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wmissing-prototypes",
                "-Wno-unused-parameter",
                "-fvisibility=hidden",  # the parts' functions stay inside the extension
                "-pthread",
            ],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
