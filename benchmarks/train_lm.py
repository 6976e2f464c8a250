"""`deltaflex train` as a script: the same options (its --help lists them).

    python benchmarks/train_lm.py --data mqar --quick --device cpu --out /tmp/run    # CPU smoke run
    python benchmarks/train_lm.py --data tokens.bin --compile --batch-size 8 --seq-len 4096 --out runs/a   # one GPU
    torchrun --nproc-per-node 8 benchmarks/train_lm.py --data tokens.bin --compile --batch-size 64 --out runs/b

The loop itself is deltaflex/train/loop.py (one file): data by position (deltaflex/train/data.py),
FSDP2 under torchrun (distributed.py), DCP checkpoints that resume on any number of ranks
(checkpoint.py).
"""

import typer

from deltaflex.cli.train import train

if __name__ == "__main__":
    typer.run(train)
