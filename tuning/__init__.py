"""Plan search and the per-GPU plan cache (installed as deltaflex.tuning).

key.py     what a tuned plan is valid for (device, versions, dtype, head dims, shape bucket)
cache.py   the plan cache file: locked atomic writes, reads that never crash
auto.py    plan="auto": the in-memory lookup delta_rule does on every call
space.py   the search space, derived from what the Plan record and the backend registry offer
check.py   a plan's correctness check against the float64 oracle
tuner.py   the optuna study: check, time, keep the fastest correct plan (optuna loads lazily)
"""
