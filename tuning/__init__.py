"""Plan search and the per-GPU plan cache (installed as deltaflex.tuning). Arrives with the tuner issue."""
