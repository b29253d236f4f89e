"""Deprecated: the reproduction grid is now ``residual-lightning grid`` (`residual_lightning.grid`).

This shim keeps ``python benchmarks/paper_grid.py [options]`` working for one release: it prints a
deprecation message and runs the package's grid with the same arguments. Removed in the next release.
"""

from __future__ import annotations

import sys

from residual_lightning.grid import main

if __name__ == "__main__":
    print(
        "benchmarks/paper_grid.py is deprecated and will be removed in the next release: "
        "use `residual-lightning grid ...`",
        file=sys.stderr,
    )
    main(sys.argv[1:])
