"""``python3 -m bench.bench_lab``: see the package's docstring."""

import sys

from bench.bench_lab.cli import main

sys.exit(main())
