"""Issue 15's prefill benchmark (deltaflex/bench_prefill.py): long prompts at few heads, forward only
under inference_mode, bf16, H200; ours (automatic, one-level, two-level at fixed segment lengths)
against fla's chunk_delta_rule with and without FLA_INTRACARD_CP=1. The same as
`deltaflex bench --regime prefill`.

    python benchmarks/bench_prefill.py --out prefill.jsonl
"""

import argparse

from deltaflex.bench_prefill import run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write one JSON line a measurement here")
    parser.add_argument("--no-fla", action="store_true", help="leave fla out")
    parser.add_argument("--intracard-timeout", type=float, default=600,
                        help="seconds for fla's IntraCard CP process (its first calls autotune)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the contenders: each one's fastest median")
    args = parser.parse_args()
    run(out=args.out, fla=not args.no_fla, intracard_timeout=args.intracard_timeout, rounds=args.rounds)
