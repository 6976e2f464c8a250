"""The MQAR experiment as a script: the same options as `deltaflex mqar` (its --help lists them).

    # H200, one call (docs/results.md): two cells, two widths, four mixers, 8 runs at a time
    python benchmarks/mqar.py --pairs 64,128 --seq-lens 512 --widths 64,128 --workers 8 --max-minutes 8.5 --out results/mqar
    python benchmarks/mqar.py --quick --device cpu --no-plot --out /tmp/mqar --workers 2   # CPU smoke run
"""

import typer

from deltaflex.cli.mqar import mqar

if __name__ == "__main__":
    typer.run(mqar)
