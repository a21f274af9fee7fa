#!/usr/bin/env bash
# The GPU rehearsal sweep on a machine whose Python already has torch (CUDA), triton and transformers and that
# has no network (run from the repository root):
#   bash benchmarks/gpu_sweep/run_rehearsal.sh start [LAYERS]   # wheels, checkpoint + problems, snakemake in the background
#   bash benchmarks/gpu_sweep/run_rehearsal.sh wait SECONDS     # follow it; returns when it ends or after SECONDS
#   bash benchmarks/gpu_sweep/run_rehearsal.sh record           # second snakemake call (must run no job) + the record
# `start` detaches snakemake (setsid) so a remote session whose single command is time-limited can follow it
# over several calls. Wheels come from benchmarks/gpu_sweep/gpu_wheels.py (in .whl/).
set -euo pipefail
CONFIG=config/presets/rehearsal-qwen3-30b-a3b-shapes.yaml
RUN_DIR=rehearsal
SITE=/tmp/moesweep-site
export PYTHONPATH="$SITE:$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SNAKEMAKE=(python3 -m snakemake --cores "${CORES:-16}" --configfile="$CONFIG")

case "${1:-}" in
start)
    if [ ! -d "$SITE" ] && compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    fi
    if [ ! -f "$RUN_DIR/qwen3-30b-a3b-shapes/model.safetensors.index.json" ]; then
        python3 benchmarks/gpu_sweep/make_rehearsal.py --layers "${2:-8}" --out "$RUN_DIR"
    fi
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 1000 > "$RUN_DIR/gpu_memory.csv" &
    echo $! > "$RUN_DIR/sampler.pid"
    rm -f "$RUN_DIR/snakemake.rc"
    date +%s > "$RUN_DIR/snakemake.start"
    setsid bash -c "${SNAKEMAKE[*]} > $RUN_DIR/snakemake.log 2>&1; echo \$? > $RUN_DIR/snakemake.rc; date +%s > $RUN_DIR/snakemake.end" \
        < /dev/null > /dev/null 2>&1 &
    echo "snakemake started"
    ;;
wait)
    deadline=$(( $(date +%s) + ${2:-500} ))
    while [ ! -f "$RUN_DIR/snakemake.rc" ] && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 10
        grep -E "^\S.*steps \([0-9]+%\) done" "$RUN_DIR/snakemake.log" | tail -1 || true
    done
    if [ -f "$RUN_DIR/snakemake.rc" ]; then
        echo "snakemake exited $(cat "$RUN_DIR/snakemake.rc") after $(( $(cat "$RUN_DIR/snakemake.end") - $(cat "$RUN_DIR/snakemake.start") )) s"
        kill "$(cat "$RUN_DIR/sampler.pid")" 2>/dev/null || true
    else
        echo "still running"
    fi
    tail -n 40 "$RUN_DIR/snakemake.log"
    ;;
record)
    "${SNAKEMAKE[@]}" -n > "$RUN_DIR/second_call.log" 2>&1 || true
    python3 benchmarks/gpu_sweep/record.py --config "$CONFIG" --run-dir "$RUN_DIR" --second-call "$RUN_DIR/second_call.log"
    ;;
*)
    echo "usage: $0 start [LAYERS] | wait SECONDS | record" >&2
    exit 2
    ;;
esac
