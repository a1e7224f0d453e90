#!/usr/bin/env bash
# benchmarks/gpu_check.sh — the check of maskaq's CUDA kernels on a lent GPU machine.
#
# Run from anywhere (it cd's to the repo root); needs python3 with torch (CUDA build), pytest
# and ninja, and nvcc; no internet. It
#   1. builds maskaq._C in place with its CUDA kernels (MASKAQ_CUDA=1, TORCH_CUDA_ARCH_LIST
#      default: the compute capabilities of this machine's GPUs, MAX_JOBS default 16) — build_ext,
#      not pip, so no dependency is resolved;
#   2. runs the CUDA tests and the op tests (tests/test_cuda.py, tests/test_ops.py,
#      tests/test_int_ops.py, the CUDA test of tests/test_integer.py), the bad-input tests in
#      steps of their own (with and without pytest's plugins) so that a crash there cannot hide
#      the other results, and benchmarks/probe_bad_input.py to tell what makes those crash;
#   3. runs benchmarks/bench_ops.py --device cuda and writes its JSON, then one ViT-B batch-128
#      synthesis step in fp32 without and with checkpoint_blocks and in bf16 with it (peak memory, time);
#   4. prints a short table last: each step's status and time, then the benchmark rows.
# Every step has its own time limit (on an H200 the whole check ran in 1.5 minutes); a failed
# step does not stop the later ones where they can still run. Logs and the JSON go to ${OUT:-/tmp}. Exit status 0 only
# when every step passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOGS="${OUT:-/tmp}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export MASKAQ_CUDA=1
# Build only for the GPUs present (one arch compiles fastest, and the check must run on whatever
# card is lent: A100, L4, H100, B200...); nvidia-smi first, torch where the driver is too old
# for compute_cap; empty leaves setup.py's default list.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  GPU_ARCHS=$( { nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
      || "$PY" -c "import torch; [print('%d.%d' % torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]" \
      2>/dev/null; } | tr -d ' ' | grep -E '^[0-9]+\.[0-9]+$' | sort -u -V | paste -sd ';' || true)
  if [[ -n "$GPU_ARCHS" ]]; then export TORCH_CUDA_ARCH_LIST="$GPU_ARCHS"; else unset TORCH_CUDA_ARCH_LIST; fi
fi
export MAX_JOBS="${MAX_JOBS:-16}"
export MASKAQ_REQUIRE_EXTENSION=1  # a broken build must fail the tests, not fall back
export PYTHONUNBUFFERED=1

declare -a STEP_NAMES=() STEP_STATUS=() STEP_SECONDS=()

# run_step NAME LIMIT_S LOGFILE CMD...: runs CMD under a time limit, tee'd to LOGFILE.
run_step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "=== ${name} (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  set +e
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local status="ok"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT"; elif [[ $rc -ne 0 ]]; then status="FAILED (rc ${rc})"; fi
  STEP_NAMES+=("$name")
  STEP_STATUS+=("$status")
  STEP_SECONDS+=("$((SECONDS - start))")
  return 0
}

step_ok() { [[ "${STEP_STATUS[$1]}" == "ok" ]]; }

# 0. The machine.
{
  nvidia-smi -L || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvcc && nvcc --version | tail -n 1
} 2>&1 | tee "$LOGS/gpu_check_env.log" || true

# 1. Build the extension in place with the CUDA kernels.
rm -f maskaq/_C*.so
run_step "build (CUDA ${TORCH_CUDA_ARCH_LIST:-default archs})" 300 "$LOGS/gpu_check_build.log" \
  "$PY" setup.py build_ext --inplace
run_step "extension loads" 60 "$LOGS/gpu_check_info.log" \
  "$PY" -c "import maskaq, json; info = maskaq.extension_info(); print(json.dumps(info)); \
assert info['loaded'] and info['with_cuda'], 'the CUDA kernels are not in maskaq._C'"

# 2. Tests (only meaningful with a loaded extension; run anyway so the log says why they fail).
TESTS=(tests/test_cuda.py)
[[ -f tests/test_ops.py ]] && TESTS+=(tests/test_ops.py)
# the integer-inference ops (int8 epilogue, int8 tensor-core attention) and the integer model on CUDA
[[ -f tests/test_int_ops.py ]] && TESTS+=(tests/test_int_ops.py)
[[ -f tests/test_integer.py ]] && TESTS+=(tests/test_integer.py::test_cuda_int_model_matches_cpu_int_model)
run_step "pytest ${TESTS[*]}" 240 "$LOGS/gpu_check_pytest.log" \
  "$PY" -m pytest "${TESTS[@]}" -q --no-header -p no:cacheprovider -rf -k "not bad_input and not rejects"
# The bad-input tests alone: on the first lent H200 (torch 2.11, Python 3.12) every ValueError
# whose message formats a number or a device, raised by maskaq._C under pytest, killed the
# process (SIGSEGV), CPU kernels included, while the same call in plain python raised cleanly.
# The second run, with pytest's third-party plugins off, and the probe in plain python tell
# whether a plugin of that image or maskaq is to blame.
run_step "bad-input tests" 120 "$LOGS/gpu_check_bad_inputs.log" \
  "$PY" -m pytest "${TESTS[@]}" -q --no-header -p no:cacheprovider -rf -k "bad_input or rejects"
run_step "bad-input tests, no pytest plugins" 120 "$LOGS/gpu_check_bad_inputs_noplugins.log" \
  env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest "${TESTS[@]}" -q --no-header -p no:cacheprovider -rf \
  -k "bad_input or rejects"
run_step "bad input in plain python" 60 "$LOGS/gpu_check_bad_input_python.log" \
  "$PY" -c "import torch, maskaq
for device in ('cpu', 'cuda'):
    q = torch.randn(2, 5, 8, device=device)
    try:
        torch.ops.maskaq.fq_attention(q, q, q, None, None, [], [], 0.3, False)
    except ValueError as e:
        print(device, 'raised ValueError:', e)"
# If the bad-input tests crash: which pytest feature, imported module or second libstdc++ is to blame.
run_step "probe of the bad-input crash" 240 "$LOGS/gpu_check_probe_bad_input.log" \
  "$PY" benchmarks/probe_bad_input.py --device cuda "${TESTS[@]%%::*}"

# 2b. NCCL: torchrun synthesis on every GPU of the machine (NCCL needs one GPU per process).
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$GPUS" -ge 2 ]] && step_ok 1; then
  run_step "torchrun NCCL synthesis on ${GPUS} GPUs" 180 "$LOGS/gpu_check_nccl.log" \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m maskaq synthesize --model vit_fmnist \
    --method maskaq --preset quick --num-images "$((GPUS * 4))" --batch-size 4 --iters 20 --device cuda \
    --out "$LOGS/nccl_synthesis"
else
  STEP_NAMES+=("torchrun NCCL synthesis"); STEP_STATUS+=("skipped (${GPUS} GPU: NCCL needs 2 or more)"); STEP_SECONDS+=(0)
fi

# 3. Benchmark.
BENCH_JSON="$LOGS/bench_ops_cuda.json"
rm -f "$BENCH_JSON"
if [[ -f benchmarks/bench_ops.py ]] && step_ok 1; then
  run_step "bench_ops --device cuda" 150 "$LOGS/gpu_check_bench.log" \
    "$PY" benchmarks/bench_ops.py --device cuda --json "$BENCH_JSON"
else
  STEP_NAMES+=("bench_ops --device cuda"); STEP_STATUS+=("skipped (no extension or no bench_ops.py)"); STEP_SECONDS+=(0)
fi

# 3b. One ViT-B synthesis step at batch 128: fp32 without and with checkpoint_blocks, bf16 with it: peak memory
# (torch.cuda.max_memory_allocated) and the step's time, for the README's "Large models" table.
if [[ -f benchmarks/bench_synthesis.py ]] && step_ok 1; then
  run_step "ViT-B b128 synthesis step memory" 200 "$LOGS/gpu_check_synthesis_memory.log" \
    "$PY" -c "
import json, sys, torch
sys.path.insert(0, 'benchmarks')
from bench_synthesis import measure_memory_point
rows = []
for precision, ckpt in (('fp32', False), ('fp32', True), ('bf16', True)):
    r = measure_memory_point('vit_base_patch16_224', 128, torch.device('cuda'), ckpt, precision)
    torch.cuda.empty_cache()
    rows.append(r)
    print(f\"vit_base b128 {precision} checkpoint_blocks={ckpt}: peak {r['peak_mb'] / 1024:.1f} GB ({r['peak_mb'] / 128:.0f} MB/image), {r['s_per_step']:.2f} s/step\")
json.dump(rows, open('$LOGS/synthesis_memory_cuda.json', 'w'), indent=1)"
else
  STEP_NAMES+=("ViT-B b128 synthesis step memory"); STEP_STATUS+=("skipped (no extension)"); STEP_SECONDS+=(0)
fi

# 4. The table.
echo
echo "=== gpu_check summary ($(head -n 1 "$LOGS/gpu_check_env.log" 2>/dev/null || echo 'no nvidia-smi'))"
printf '%-44s %-30s %6s\n' "step" "status" "s"
for i in "${!STEP_NAMES[@]}"; do
  printf '%-44s %-30s %6s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECONDS[$i]}"
done
for log in pytest bad_inputs bad_inputs_noplugins; do
  tail -n 1 "$LOGS/gpu_check_${log}.log" 2>/dev/null | sed "s/^/${log}: /" || true
done
grep -v "^===" "$LOGS/gpu_check_probe_bad_input.log" 2>/dev/null | sed "s/^/probe: /" || true
grep -h "^vit_base b128" "$LOGS/gpu_check_synthesis_memory.log" 2>/dev/null || true
if [[ -f "$BENCH_JSON" ]]; then
  "$PY" - "$BENCH_JSON" <<'EOF' || true
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"\n{'op':<28} {'shape':<22} {'impl':<10} {'ms':>9} {'vs ref':>8}")
for r in rows:
    shape = "x".join(map(str, r["shape"])) if isinstance(r["shape"], (list, tuple)) else str(r["shape"])
    speed = r.get("speedup_vs_reference")
    speed = f"{speed:.2f}x" if isinstance(speed, (int, float)) else "-"
    print(f"{r['op']:<28} {shape:<22} {r['impl']:<10} {r['ms']:>9.3f} {speed:>8}")
EOF
fi
echo "logs: $LOGS/gpu_check_*.log"

for status in "${STEP_STATUS[@]}"; do
  [[ "$status" == "ok" || "$status" == skipped* ]] || exit 1
done
exit 0
