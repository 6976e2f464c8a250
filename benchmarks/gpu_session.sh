#!/usr/bin/env bash
# Everything one GPU call does, logs under $OUT, a short table last. Run through the device tool with
# `.whl` carried (../shared/tools/gpu-wheels.sh fills it):
#   bash benchmarks/gpu_session.sh tests profile bench
# Steps: tests (the whole suite, GPU tests included, or $TESTS_PATHS: on the H200 the whole suite
# takes more than one call (78 % in 540 s with 16 workers); -v, so tests.log says which test each
# xdist worker ran before a failure; export CUDA_LAUNCH_BLOCKING=1 to pin a CUDA fault on its launch),
# profile (benchmarks/profile_plan.py at $PROFILE_SHAPES for $PLANS), probe (benchmarks/probe_blocks.py), bench (deltaflex bench at $BENCH_SHAPES, or all of DESIGN.md's),
# tune (deltaflex tune --gpu at $TUNE_SHAPES, $TUNE_TRIALS trials / $TUNE_TIMEOUT s a shape; tuned plans exported to
# $OUT/plans.json), compare (deltaflex compare at $COMPARE_SHAPES, table and plot under $OUT).
# The plan cache and the tuner's studies live in .deltaflex-cache, so a warm machine's next call resumes them.
# fp16 (benchmarks/probes/fused_fp16.py: tests/fused's fp16 case over $FP16_SEEDS seeds, at NARROW_WARPS, at 4 warps and after a float32 run, buffers NaN-poisoned where $FP16_POISON is set; the
# non-finite seeds' inputs under $OUT/fp16, to replay in the interpreter).
# configs (benchmarks/probes/fused_configs.py, one line of its arguments per line of $CONFIGS: which launch
# configurations and chunk.py switches compute right on this GPU).
# Every step runs under the call's deadline ($DEADLINE s from the start, default 570: the device tool stops a
# command at 600), so the tuning cache and the archive are always saved.
# kernels (benchmarks/profile_kernels.py: Triton stage, fusion and launch-config timings; $KERNELS_FLAGS),
# variants (benchmarks/probes/fused_variants.py: chunk.py variants checked and timed in one process; $VARIANTS),
# packed (profile_plan.py on 16K packed tokens, documents of mean length 512, $PACKED_PLANS against fla),
# prefill (benchmarks/bench_prefill.py, issue 15's table; $PREFILL_INTRACARD_S), layer (benchmarks/bench_layer.py; $LAYER_FLAGS), lm (benchmarks/bench_lm.py; $LM_FLAGS),
# mqar (benchmarks/mqar.py; $MQAR_FLAGS), train (deltaflex train on random tokens, $TRAIN_GPUS ranks under torchrun
# when > 1, $TRAIN_FLAGS; the run folder, checkpoints included, stays in /tmp: run.json and metrics.jsonl come back).
set -uo pipefail
OUT=${OUT:-/tmp/deltaflex-out}
mkdir -p "$OUT"
# The device tool brings back at most 8 files: everything travels as one archive, made last (or alone,
# after steps cut short by an outer timeout: `bash benchmarks/gpu_session.sh pack`).
pack() { (cd "$OUT" && n=$(find . -maxdepth 1 -name 'results-*.tgz' | wc -l) && tar czf "/tmp/results-$n.tgz" --exclude 'results-*.tgz' . \
  && find . -mindepth 1 ! -name 'results-*.tgz' -delete && mv "/tmp/results-$n.tgz" .); }
[ "$*" = pack ] && { pack; exit; }
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-570}
# seconds to the deadline (at most $1), and a command run within them
left() { local n=$((DEADLINE - SECONDS)); [ -n "${1:-}" ] && [ "$1" -lt "$n" ] && n=$1; echo $((n > 1 ? n : 1)); }
within() { timeout -k 5 "$(left)" "$@"; }
# Triton's autotuning results (fla tunes 30-150 s per head dim on a first call) kept between calls:
# the last call's come back as $OUT/tcache; carried back as .tcache, they spare the next machine the tuning.
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
for d in benchmarks/fla-autotune .tcache; do [ -d $d ] && cp -r $d/. "$TRITON_CACHE_DIR"/; done  # committed, then carried
save_tuning() { mkdir -p "$OUT/tcache" && (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 \
  | tar --null -cf - -T - | tar -xf - -C "$OUT/tcache"); }
export DELTAFLEX_CACHE_DIR=${DELTAFLEX_CACHE_DIR:-$PWD/.deltaflex-cache}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1; } | tee "$OUT/env.txt"

PLANS=${PLANS:-compiled}
plan_args=(); for p in $PLANS; do plan_args+=(--plan "$p"); done
for step in "$@"; do
  case "$step" in
    tests)
      # one CPU thread and one Inductor compile worker per xdist worker: by default each of the 16 workers
      # takes every core for its CPU ops and compile pool (hundreds of threads on 16 cores)
      OMP_NUM_THREADS=${TESTS_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TESTS_THREADS:-1} \
      DELTAFLEX_FAILURE_LOG="$OUT/test_failures.log" DELTAFLEX_DURATIONS_LOG="$OUT/test_durations.log" timeout -k 10 "$(left "${TESTS_TIMEOUT:-300}")" python3 -m pytest -v -n ${TESTS_WORKERS:-8} -p no:cacheprovider --durations=15 ${TESTS_K:+-k "$TESTS_K"} ${TESTS_PATHS:-tests} >"$OUT/tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; tail -3 "$OUT/tests.log"
      grep "^== " "$OUT/test_failures.log" 2>/dev/null | head -30
      sort -rn "$OUT/test_durations.log" 2>/dev/null | head -${TESTS_SLOWEST:-10} ;;
    profile)
      for shape in ${PROFILE_SHAPES:-4,4096,16,128}; do
        within python3 benchmarks/profile_plan.py --shape "$shape" "${plan_args[@]}" ${PROFILE_FLAGS:-} --out "$OUT" 2>&1 \
          | grep -v -i warn | tail -${PROFILE_TAIL:-12}
      done ;;
    kernels)
      within python3 benchmarks/profile_kernels.py ${KERNELS_FLAGS:-} --out "$OUT" 2>&1 | grep -v -i warn \
        | tee "$OUT/kernels.log" | tail -${KERNELS_TAIL:-40} ;;
    variants)
      # benchmarks/probes/fused_variants.py: $VARIANTS (JSON, one argument) at $VARIANTS_SHAPES
      shape_args=(); for s in ${VARIANTS_SHAPES:-4,4096,16,128}; do shape_args+=(--shape "$s"); done
      within python3 benchmarks/probes/fused_variants.py "${shape_args[@]}" --variants "$VARIANTS" ${VARIANTS_FLAGS:-} \
        --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/variants.log" | tail -${VARIANTS_TAIL:-40} ;;
    probe)
      within python3 benchmarks/probe_blocks.py 2>&1 | tee "$OUT/probe.log" | tail -12 ;;
    bench)
      shape_args=(); for s in ${BENCH_SHAPES:-}; do shape_args+=(--shape "$s"); done
      within python3 -m deltaflex.cli.app bench "${shape_args[@]}" "${plan_args[@]}" ${BENCH_FLAGS:-} --out "$OUT" 2>&1 \
        | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-40} ;;
    tune)
      shape_args=(); for s in ${TUNE_SHAPES:-4,4096,16,128}; do shape_args+=(--shape "$s"); done
      within python3 -m deltaflex.cli.app tune --gpu "${shape_args[@]}" --trials "${TUNE_TRIALS:-20}" --timeout "${TUNE_TIMEOUT:-420}" \
        ${TUNE_FLAGS:-} 2>&1 | tee "$OUT/tune.log" | tail -${TUNE_TAIL:-25}
      python3 -m deltaflex.cli.app plans export "$OUT/plans.json" --force | tail -1 ;;
    compare)
      shape_args=(); for s in ${COMPARE_SHAPES:-4,4096,16,128}; do shape_args+=(--shape "$s"); done
      within python3 -m deltaflex.cli.app compare "${shape_args[@]}" ${COMPARE_FLAGS:-} --plot "$OUT/compare.png" --out "$OUT" 2>&1 \
        | tee "$OUT/compare.log" | tail -${COMPARE_TAIL:-25} ;;
    packed)
      packed_args=(); for p in ${PACKED_PLANS:-compiled}; do packed_args+=(--plan "$p"); done
      within python3 benchmarks/profile_plan.py --shape 1,16384,16,128 --packed-mean 512 "${packed_args[@]}" --fla --out "$OUT" 2>&1 \
        | grep -v -i warn | tee "$OUT/packed.log" | tail -12 ;;
    prefill)
      # issue 15's table (benchmarks/bench_prefill.py): fla's IntraCard CP first, in $PREFILL_INTRACARD_S
      # seconds, the whole step in $PREFILL_S
      timeout -k 5 "$(left "${PREFILL_S:-570}")" python3 benchmarks/bench_prefill.py --out "$OUT/prefill.jsonl" --intracard-timeout "${PREFILL_INTRACARD_S:-240}" \
        2>&1 | grep -v -i warn | tee "$OUT/prefill.log" | tail -${PREFILL_TAIL:-25} ;;
    layer)
      within python3 benchmarks/bench_layer.py --out "$OUT" ${LAYER_FLAGS:-} 2>&1 | grep -v -i warn | tee "$OUT/layer.log" | tail -30 ;;
    lm)
      within python3 benchmarks/bench_lm.py --out "$OUT" ${LM_FLAGS:-} 2>&1 | grep -v -i warn | tee "$OUT/lm.log" | tail -${LM_TAIL:-22} ;;
    mqar)
      within python3 benchmarks/mqar.py --out "$OUT/mqar" ${MQAR_FLAGS:-} 2>&1 | grep -v -i warn | tee "$OUT/mqar.log" | tail -25 ;;
    train)
      tokens=/tmp/deltaflex-tokens.bin gpus=${TRAIN_GPUS:-1} run=/tmp/deltaflex-train-${TRAIN_GPUS:-1}gpu
      [ -f $tokens ] || python3 -c "import torch; from deltaflex.train import write_token_file; write_token_file('$tokens', torch.randint(0, 32000, (${TRAIN_TOKENS:-20000000},)))"
      launch=(python3 -m deltaflex.cli); [ "$gpus" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m deltaflex.cli)
      rm -rf "$run"; within "${launch[@]}" train --data $tokens --out "$run" ${TRAIN_FLAGS:-} 2>&1 | grep -v -i warn | tee "$OUT/train-${gpus}gpu.log" | tail -4
      mkdir -p "$OUT/train-${gpus}gpu" && cp "$run"/run.json "$run"/metrics.jsonl "$OUT/train-${gpus}gpu/" ;;
    fp16)
      within python3 benchmarks/probes/fused_fp16.py --seeds "${FP16_SEEDS:-20}" --save "$OUT/fp16" ${FP16_POISON:+--poison} 2>&1 | tee "$OUT/fp16.log" | tail -3
      within python3 benchmarks/probes/fused_fp16.py --seeds "${FP16_SEEDS:-20}" --warps 4 ${FP16_POISON:+--poison} 2>&1 | tee -a "$OUT/fp16.log" | tail -1
      within python3 benchmarks/probes/fused_fp16.py --seeds "${FP16_SEEDS:-20}" --first float32 ${FP16_POISON:+--poison} 2>&1 | tee -a "$OUT/fp16.log" | tail -1 ;;
    configs)
      while IFS= read -r line; do
        [ -n "$line" ] && eval within python3 benchmarks/probes/fused_configs.py "$line" 2>&1 | tee -a "$OUT/configs.log"
      done <<< "${CONFIGS:-state_out -}" ;;
    *) echo "unknown step $step" ;;
  esac
done
save_tuning
pack
