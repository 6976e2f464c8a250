"""The MQAR experiment as a script: the same options as `deltaflex mqar` (its --help lists them).

    python benchmarks/mqar.py --out results/mqar --max-minutes 9     # H200: the paper's hard setting
    python benchmarks/mqar.py --quick --device cpu --no-plot --out /tmp/mqar   # CPU smoke run
"""

import typer

from deltaflex.cli.mqar import mqar

if __name__ == "__main__":
    typer.run(mqar)
