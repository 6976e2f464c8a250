"""`python -m deltaflex.cli ...` (e.g. under torchrun: `torchrun --nproc-per-node 8 -m deltaflex.cli train ...`)."""

from .app import main

main()
