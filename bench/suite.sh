#!/usr/bin/env bash
# The benchmark suite behind `make bench` (default) and `make bench-full`.
#
#   bench/suite.sh [default|full]
#
# default: overlap (engine vs mpi4py) on loopback and an emulated 1 Gbit/s
#          link; the step benchmark for every strategy on resnet20 and
#          vgg16-cifar, 2 ranks, loopback and 1 Gbit/s; CNN throughput.
# full:    also 10 Gbit/s links, more iterations and throughput rounds.
# Every run writes JSON to bench/results/; bench/report.py then writes the
# markdown tables and plots (bench/results/summary.md, *.png) and refreshes
# the README's performance section. Emulated links need root (bench/netlink);
# without it those runs are skipped with a message.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-default}
PY=${PY:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
OUT=bench/results
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1
# Some machines set these for old OpenBLAS builds; they slow numpy's current
# one (tests and CI keep them).
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

links=(loopback 1gbit)
[ "$mode" = full ] && links+=(10gbit)
iters=6
[ "$mode" = full ] && iters=8
# throughput: fresh processes per framework, alternating (median reported)
rounds=3
[ "$mode" = full ] && rounds=5

netlink_ok=1
bench/netlink --rate 1gbit -- true 2>/dev/null || { netlink_ok=0; echo "suite: emulated links unavailable (bench/netlink needs root and iproute2); running loopback only"; }

run_on() {   # run_on LINK COMMAND...
    local link=$1; shift
    if [ "$link" = loopback ]; then "$@"; else
        [ "$netlink_ok" = 1 ] || return 0
        bench/netlink --rate "$link" -- "$@"
    fi
}

for link in "${links[@]}"; do
    echo "== overlap on $link"
    run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.overlap --json-out "$OUT/overlap_$link.json" --link "$link"
done

for model in resnet20 vgg16-cifar; do
    for link in "${links[@]}"; do
        for strategy in blocking layerwise bucketed priority multistep; do
            echo "== step $model $strategy $link"
            run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.step --model "$model" --strategy "$strategy" \
                --batch-size-per-rank 32 --iters "$iters" --warmup 2 --link "$link" \
                --json-out "$OUT/step_${model}_${strategy}_${link}.json"
        done
        echo "== peers $model $link"
        run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.peers.mpi4py_allreduce --model "$model" \
            --batch-size-per-rank 32 --iters "$iters" --warmup 2 --link "$link" \
            --json-out "$OUT/step_${model}_mpi4py_${link}.json"
        if "$PY" -c "import torch" 2>/dev/null; then
            run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.peers.ddp --model "$model" \
                --batch-size-per-rank 32 --iters "$iters" --warmup 2 --link "$link" \
                --json-out "$OUT/step_${model}_ddp_${link}.json"
        else
            echo "suite: torch not installed (make torch): no DDP row"
        fi
    done
done

# Timelines for the README: the same 3 iterations of vgg16-cifar on a
# communication-bound link (1 Gbit/s) and a compute-bound one (10 Gbit/s).
tlinks=(1gbit 10gbit)
[ "$netlink_ok" = 1 ] || tlinks=(loopback)
for tlink in "${tlinks[@]}"; do
    for strategy in blocking multistep; do
        echo "== timeline $strategy $tlink"
        run_on "$tlink" "$MPIEXEC" -n 2 "$PY" -m engine.train --model vgg16-cifar --dataset synthetic \
            --synthetic-size 512 --batch-size 64 --iters 3 --strategy "$strategy" --no-progress \
            --trace "$OUT/trace_${strategy}_${tlink}.json" > /dev/null
        "$PY" -m analysis.plot_trace "$OUT/trace_${strategy}_${tlink}.json" \
            -o "$OUT/timeline_${strategy}_${tlink}.png" --title "$strategy, vgg16-cifar, 2 ranks, $tlink"
    done
done

for model in resnet20 vgg16-cifar; do
    for threads in 1 2; do
        echo "== throughput $model threads=$threads"
        env -u OPENBLAS_NUM_THREADS -u NUMBA_NUM_THREADS -u OMP_NUM_THREADS "$PY" -m bench.cnn_throughput \
            --model "$model" --batch 64 --threads "$threads" --rounds "$rounds" \
            --json-out "$OUT/throughput_${model}_t${threads}.json" \
            $("$PY" -c "import torch" 2>/dev/null && echo --compare-torch)
    done
done

# Allreduce algorithms side by side (docs/allreduce_algorithms.md): auto's
# thresholds are calibrated on the link first (merged into its netfit file)
for link in "${links[@]}"; do
    echo "== allreduce algorithms on $link"
    run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.netfit --only-algorithms --algorithms-budget-s 3 \
        -o "$OUT/netfit_$link.json" > /dev/null
    run_on "$link" "$MPIEXEC" -n 2 "$PY" -m bench.algorithms --link "$link" --budget-s 6 \
        --json-out "$OUT/algorithms_$link.json" --md-out "$OUT/algorithms_$link.md" \
        --plot "$OUT/algorithms_$link.png" > /dev/null
done

# Faults: stalls, dead ranks, bad checkpoints, restarts (docs/faults.md)
echo "== faults"
"$PY" bench/faults.py --json-out "$OUT/faults_2ranks.json" > /dev/null

# Ensembles, stragglers, background checkpoints (docs/ensemble.md, docs/stragglers.md)
echo "== ensemble (shared, distributed and separate pipelines)"
"$PY" -m bench.ensemble --json-out "$OUT/ensemble_lenet-cifar.json" > /dev/null
"$PY" -m bench.ensemble --pipeline-rank --pipelines shared,separate --json-out "$OUT/ensemble_lenet-cifar_pipeline-rank.json" > /dev/null
"$PY" -m bench.ensemble --model resnet20 --json-out "$OUT/ensemble_resnet20.json" > /dev/null
echo "== stragglers"
"$MPIEXEC" -n 2 "$PY" -m bench.stragglers $([ "$mode" = full ] && echo --full) \
    --json-out "$OUT/stragglers.json" > /dev/null
echo "== checkpoints, sync vs async"
# multistep in both formats (sharded: each rank writes its slices; single: gathered)
for run in multistep:sharded: multistep:single:_single priority:single:_priority; do
    IFS=: read -r strategy format suffix <<< "$run"
    "$MPIEXEC" -n 2 "$PY" -m bench.checkpoint_async --every 4,16 --strategy "$strategy" \
        --format "$format" --json-out "$OUT/checkpoint_async$suffix.json" > /dev/null
    if [ "$mode" = full ]; then
        run_on 1gbit "$MPIEXEC" -n 2 "$PY" -m bench.checkpoint_async --every 4,16 \
            --strategy "$strategy" --format "$format" --link 1gbit \
            --json-out "$OUT/checkpoint_async${suffix}_1gbit.json" > /dev/null
    fi
done

if [ "$mode" = full ]; then
    echo "== cost model check and scaling simulation"
    "$PY" -m bench.model_check -o "$OUT/model_check_resnet20.json" || true
    "$PY" -m bench.simulate || true
    "$PY" -m bench.simulate --machine bench/machines/ib100.json || true
fi

"$PY" -m bench.report
