"""The paper's kernel benchmark (docs/benchmarks.md); the same as `deltaflex bench` (see `--help`).

    python benchmarks/bench_delta_rule.py --out results/
"""

from deltaflex.cli.app import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]])
