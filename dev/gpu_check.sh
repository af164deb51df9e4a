#!/bin/bash
# One pass over a GPU machine: build (or reuse carried binaries), the CUDA tests, the attention
# variants, the trainer benchmark. Logs go to $OUT (or ./out) so they can be fetched afterwards.
#   bash dev/gpu_check.sh [test] [attn] [hc] [bench] [bench24] [table] [profile] [ncu] [sanitize] [multi] [scale]
#   (default: test attn hc bench; multi and scale need 2 GPUs: the nvidia-h200-x2 kind)
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
steps=${*:-test attn hc bench}
NV="train_gpt_hcu train_gpt_hcu_fp32 test_gpt_hcu test_gpt_hcu_fp32 dev/cuda/bench_attention dev/cuda/bench_hc"
if [ -f .devbin.tar ]; then tar xf .devbin.tar; fi
for b in $NV; do   # binaries built elsewhere must load their libraries here, else rebuild
    if [ ! -x "$b" ] || ldd "$b" | grep -q "not found"; then make -j16 cuda-build 2>&1 | tail -3; break; fi
done
make -j4 train_gpt_hc test_gpt_hc > /dev/null 2>&1 || { echo "error: CPU build failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
rc=0
for s in $steps; do
    case $s in
    test)
        ./test_gpt_hcu_fp32 2>&1 | tee "$OUT/test_fp32.txt" | grep -E "FAIL|passed" || rc=1
        ./test_gpt_hcu 2>&1 | tee "$OUT/test_bf16.txt" | grep -E "FAIL|passed|attention" || rc=1
        GPT_HC_TRAINER=./train_gpt_hcu ./test_gpt_hc --cli-only 2>&1 | tee "$OUT/test_cli.txt" | grep -E "FAIL|passed" || rc=1 ;;
    attn) ./dev/cuda/bench_attention 2>&1 | tee "$OUT/attention.txt" || rc=1 ;;
    hc) ./dev/cuda/bench_hc 2>&1 | tee "$OUT/hc_kernels.txt" || rc=1 ;;
    bench) python3 dev/bench_cuda.py --steps 10 2>&1 | tee "$OUT/bench_d12.txt" || rc=1 ;;
    profile) python3 dev/bench_cuda.py --steps 10 --profile --modes residual mhc:4 2>&1 | tee "$OUT/profile_d12.txt" || rc=1 ;;
    ncu)   # per-kernel GPU time over one d12 step (the first step, so every kernel appears once)
        for mode in "residual" "mhc -E 4"; do
            tag=$(echo $mode | cut -d' ' -f1)
            ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
                ./train_gpt_hcu -e d12 -H $mode -b 16 -t 1024 -x 1 -v 0 -s 0 -i 'data/tiny/tiny_train_*.bin' -j 'data/tiny/tiny_val_*.bin' \
                > "$OUT/ncu_$tag.csv" 2> "$OUT/ncu_$tag.err" || { rc=1; tail -3 "$OUT/ncu_$tag.err"; }
            python3 dev/ncu_summary.py "$OUT/ncu_$tag.csv" | head -30 || head -c 1500 "$OUT/ncu_$tag.csv"
        done ;;
    sanitize)   # memcheck over the BF16 tests and a short mhc run; racecheck over the shared-memory kernels
        compute-sanitizer --tool memcheck --print-limit 5 ./test_gpt_hcu --ref-only 2>&1 | tee "$OUT/memcheck_test.txt" | grep -E "ERROR SUMMARY|passed" || rc=1
        compute-sanitizer --tool memcheck --print-limit 5 ./train_gpt_hcu -e d4 -H mhc -E 4 -b 2 -t 256 -x 2 -v 1 -m 2 -s 0 \
            -i 'data/tiny/tiny_train_*.bin' -j 'data/tiny/tiny_val_*.bin' 2>&1 | tee "$OUT/memcheck_train.txt" | grep -E "ERROR SUMMARY" || rc=1
        # cuDNN's SDPA kernels (wgmma, TMA + mbarriers) draw racecheck reports of their own, as cuBLAS's do: counted apart
        compute-sanitizer --tool racecheck --print-limit 100 ./dev/cuda/bench_attention 1 128 2 > "$OUT/racecheck_attn.txt" 2>&1
        grep -E "agree" "$OUT/racecheck_attn.txt" | tail -1
        ours=$(grep "Race reported" "$OUT/racecheck_attn.txt" | grep -vc cudnn_generated)
        echo "racecheck bench_attention: $ours hazards in our kernels, $(grep "Race reported" "$OUT/racecheck_attn.txt" | grep -c cudnn_generated) reports inside cuDNN"
        [ "$ours" = 0 ] || rc=1
        # checks only, BT = 12800, C = 64: several token tiles per block in the dH pass and in the boundary
        # kernel (its grid is fixed at 396 blocks; three tiles each reuse every buffer). The cuBLAS GEMMs
        # of the reference variants (nvjet kernels, TMA + mbarriers) draw racecheck reports of their
        # own: counted apart
        compute-sanitizer --tool racecheck --print-limit 100 ./dev/cuda/bench_hc 12800 64 check > "$OUT/racecheck_hc.txt" 2>&1
        grep -E "check:" "$OUT/racecheck_hc.txt"
        grep -q DISAGREE "$OUT/racecheck_hc.txt" && rc=1
        ours=$(grep "Race reported" "$OUT/racecheck_hc.txt" | grep -vc nvjet)
        echo "racecheck bench_hc: $ours hazards in our kernels, $(grep "Race reported" "$OUT/racecheck_hc.txt" | grep -c nvjet) reports inside cuBLAS (nvjet)"
        [ "$ours" = 0 ] || rc=1 ;;
    bench24) python3 dev/bench_cuda.py --steps 6 --depth 24 --modes residual mhc:4 2>&1 | tee "$OUT/bench_d24.txt" || rc=1 ;;
    multi)   # data parallel on 2 GPUs: bit-exact against 1 GPU in FP32 and BF16
        export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on the shared machines
        mpi=""   # with MPI installed, an FP32 USE_MPI build joins the FP32 comparison under mpirun
        if command -v mpicc > /dev/null && make train_gpt_hcu_mpi PRECISION=FP32 > "$OUT/build_mpi.txt" 2>&1; then mpi=./train_gpt_hcu_mpi; fi
        GPT_HC_MPI_TRAINER=$mpi GPT_HC_TRAINER=./train_gpt_hcu_fp32 ./test_gpt_hc --multi-gpu 2>&1 | tee "$OUT/test_multi_fp32.txt" | grep -E "FAIL|PASS|passed|diff" || rc=1
        GPT_HC_TRAINER=./train_gpt_hcu GPT_HC_CPU_TOL=1e-2 ./test_gpt_hc --multi-gpu 2>&1 | tee "$OUT/test_multi_bf16.txt" | grep -E "FAIL|PASS|passed|diff" || rc=1 ;;
    scale)   # tokens/s on 1 and 2 GPUs, d12 and d24, residual and mhc n=4
        export NCCL_NVLS_ENABLE=0
        python3 dev/bench_cuda.py --steps 10 --depth 12 24 --modes residual mhc:4 --gpus 1 2 2>&1 | tee "$OUT/bench_scaling.txt" || rc=1 ;;
    table)   # every mode at n = 2, 4, 8 for d12 and d24 (issue 5's table)
        python3 dev/bench_cuda.py --steps 6 --depth 12 24 --modes residual shc:2 shc:4 shc:8 dhc:2 dhc:4 dhc:8 mhc:2 mhc:4 mhc:8 \
            2>&1 | tee "$OUT/bench_table.txt" || rc=1 ;;
    *) echo "unknown step $s"; rc=1 ;;
    esac
done
exit $rc
