# gpt_hc: GPT-2 with Hyper-Connections (residual | shc | dhc | mhc), llm.c style.
#   make train      prepare the tiny data if missing, train a small model on the CPU
#   make test       tokenizer/data tests + CPU trainer tests against the PyTorch dumps + sweep/plot tests
#   make            build the CPU trainer and its test
#   make cuda-build build the CUDA trainer (PRECISION=BF16 default, or FP32) and its tests
#   make test-cuda  on a GPU machine: CUDA tests in FP32 and BF16, CPU vs CUDA, CLI tests
#   make test-multigpu  on a machine with 2 GPUs: data-parallel runs against 1-GPU runs
CC ?= gcc
CFLAGS ?= -O3 -march=native -Wall -Wextra -Wno-unused-function -Wno-unused-parameter -Wno-format-truncation
OMPFLAGS ?= -fopenmp -DOMP
LDLIBS = -lm
PYTHON ?= python3
SHELL := /bin/bash

.PHONY: all train test test-data test-c test-sweep test-asan cuda-build test-cuda test-multigpu bench-cuda data data-small data-large ref bench-cpu loss-gap loss-gap-plots clean

all: train_gpt_hc test_gpt_hc

train_gpt_hc: train_gpt_hc.c llmc/*.h
	$(CC) $(CFLAGS) $(OMPFLAGS) $< $(LDLIBS) -o $@

test_gpt_hc: test_gpt_hc.c train_gpt_hc.c llmc/*.h
	$(CC) $(CFLAGS) $(OMPFLAGS) $< $(LDLIBS) -o $@

# CUDA: Hopper (sm_90); cuDNN headers live under /usr/include/x86_64-linux-gnu on these machines
NVCC ?= nvcc
PRECISION ?= BF16
NVCCFLAGS ?= -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -I/usr/include/x86_64-linux-gnu
NVLIBS = -lcublas -lcublasLt -lcudnn -lnccl
# MPI is optional (only -pi mpi, i.e. mpirun without -pi, needs it): USE_MPI=1 builds the trainer
# with it, or make train_gpt_hcu_mpi; both need mpicc (Open MPI)
MPIFLAGS = -DUSE_MPI $(shell mpicc --showme:compile 2>/dev/null)
MPILIBS = $(shell mpicc --showme:link 2>/dev/null || echo -lmpi)
ifeq ($(USE_MPI),1)
NVCCFLAGS += $(MPIFLAGS)
NVLIBS += $(MPILIBS)
endif
ifeq ($(PRECISION),FP32)
PRECFLAG = -DENABLE_FP32
else ifeq ($(PRECISION),BF16)
PRECFLAG =
else
$(error PRECISION must be FP32 or BF16)
endif

train_gpt_hcu: train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) $(PRECFLAG) $< $(NVLIBS) -o $@
train_gpt_hcu_mpi: train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) $(PRECFLAG) $(MPIFLAGS) $< $(NVLIBS) $(MPILIBS) -o $@
train_gpt_hcu_fp32: train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) -DENABLE_FP32 $< $(NVLIBS) -o $@
test_gpt_hcu: test_gpt_hcu.cu train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) $< $(NVLIBS) -o $@
test_gpt_hcu_fp32: test_gpt_hcu.cu train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) -DENABLE_FP32 $< $(NVLIBS) -o $@

dev/cuda/bench_attention: dev/cuda/bench_attention.cu train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) $< $(NVLIBS) -o $@
dev/cuda/bench_hc: dev/cuda/bench_hc.cu train_gpt_hc.cu llmc/*.h
	$(NVCC) $(NVCCFLAGS) $< $(NVLIBS) -o $@

cuda-build: train_gpt_hcu train_gpt_hcu_fp32 test_gpt_hcu test_gpt_hcu_fp32 dev/cuda/bench_attention dev/cuda/bench_hc

# on a machine with 2 GPUs: 2-GPU runs equal 1-GPU runs (FP32 and BF16), checkpoints across GPU counts
test-multigpu: train_gpt_hcu train_gpt_hcu_fp32 train_gpt_hc test_gpt_hc
	GPT_HC_TRAINER=./train_gpt_hcu_fp32 ./test_gpt_hc --multi-gpu
	GPT_HC_TRAINER=./train_gpt_hcu GPT_HC_CPU_TOL=1e-2 ./test_gpt_hc --multi-gpu

test-cuda: cuda-build train_gpt_hc test_gpt_hc
	./test_gpt_hcu_fp32
	./test_gpt_hcu
	GPT_HC_TRAINER=./train_gpt_hcu ./test_gpt_hc --cli-only

data: data/tiny/manifest.json data/gpt2_tokenizer.bin
data/tiny/manifest.json data/gpt2_tokenizer.bin:
	$(PYTHON) scripts/prepare_data.py tiny
data-small:
	$(PYTHON) scripts/prepare_data.py small
data-large:
	$(PYTHON) scripts/prepare_data.py large

# the default run: a d4 GPT-2 (residual; add MODE=mhc etc.) on the tiny corpus, a few minutes
MODE ?= residual
STEPS ?= 300
train: train_gpt_hc data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} ./train_gpt_hc -e d4 -H $(MODE) -b 4 -t 64 -l 1e-3 -u 20 -q 0.1 -x $(STEPS) -v 50 -s 100 -o log_$(MODE)

test: test-data test-c test-sweep

test-data: data
	$(PYTHON) scripts/test_data.py

# the loss-gap sweep and plot scripts on the CPU trainer (plots need matplotlib in PLOT_PYTHON)
test-sweep: train_gpt_hc data
	$(PYTHON) scripts/test_sweep.py --plot-python $(PLOT_PYTHON)

test-c: train_gpt_hc test_gpt_hc
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} ./test_gpt_hc

# the C tests once more with AddressSanitizer + UndefinedBehaviorSanitizer (trainer included)
SANFLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -Wall -Wno-format-truncation
test-asan: train_gpt_hc.c test_gpt_hc.c llmc/*.h
	$(CC) $(SANFLAGS) $(OMPFLAGS) train_gpt_hc.c $(LDLIBS) -o train_gpt_hc_asan
	$(CC) $(SANFLAGS) $(OMPFLAGS) test_gpt_hc.c $(LDLIBS) -o test_gpt_hc_asan
	GPT_HC_TRAINER=./train_gpt_hc_asan OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} ./test_gpt_hc_asan

bench-cpu: train_gpt_hc data
	$(PYTHON) dev/bench_cpu.py

# the loss-gap reproduction of docs/RESULTS.md, on a GPU machine with data/large prepared (make
# data-large here, carry it over): the stability runs (d24 at lr 3e-3, 500 steps), then residual,
# shc, dhc, mhc (n=4) from identical base weights, SEEDS, one epoch of d12, the learning rate
# tuned on residual. A cut-off sweep continues where it stopped. Plots need matplotlib.
LOSSGAP ?= out/loss_gap
SEEDS ?= 1 2 3
PLOT_PYTHON ?= /usr/bin/python3
LARGE = -i 'data/large/large_train_*.bin' -j 'data/large/large_val_*.bin'
loss-gap:
	$(PYTHON) scripts/sweep.py --trainer ./train_gpt_hcu --out $(LOSSGAP)/stability --seeds 1 --lr 3e-3 --clean \
		-- -e d24 $(LARGE) -b 16 -t 1024 -x 500 -u 50 -v 25 -m 5 -s 0
	$(PYTHON) scripts/sweep.py --trainer ./train_gpt_hcu --out $(LOSSGAP)/d12 --seeds $(SEEDS) --tune-lr 3e-4 6e-4 1.2e-3 2.4e-3 --clean \
		-- -e d12 $(LARGE) -b 16 -t 1024 -u 100 -q 0.1 -v 100 -m 20 -s 0
loss-gap-plots:
	$(PLOT_PYTHON) scripts/plot_hc.py $(LOSSGAP)/d12 --title "d12, 1 epoch of data/large"
	$(PLOT_PYTHON) scripts/plot_hc.py $(LOSSGAP)/stability --title "d24, lr 3e-3"

# regenerate the committed reference dumps (needs PyTorch)
ref:
	$(PYTHON) scripts/reference.py

clean:
	rm -f train_gpt_hc test_gpt_hc train_gpt_hc_asan test_gpt_hc_asan train_gpt_hcu train_gpt_hcu_mpi test_gpt_hcu train_gpt_hcu_fp32 test_gpt_hcu_fp32 dev/cuda/bench_attention dev/cuda/bench_hc *.o
