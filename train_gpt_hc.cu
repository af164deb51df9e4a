/*
gpt_hc CUDA trainer: the model of train_gpt_hc.c (../shared/SPEC.md) on one GPU, with the same
command line, checkpoints and logs (llmc/train_main.h drives both).
  make train_gpt_hcu                    # PRECISION=BF16 (default): bf16 activations and weight
                                        # copies, fp32 master weights, grads, AdamW state
  make train_gpt_hcu PRECISION=FP32     # everything fp32 (the tests compare it to PyTorch)
HC/mHC coefficients, LayerNorm statistics, Sinkhorn-Knopp and every reduction run in fp32.
Every reduction is done in a fixed order without atomics, so runs are deterministic.

Matmuls run through cuBLASLt with the bias, GELU and GELU-gradient fused into the epilogues; the
backward's weight gradients run on a side stream beside the memory-bound kernels, mHC's
Sinkhorn-Knopp iterations (forward and backward) and the HC parameter gradients' column sums on a
third beside the GEMMs. Attention in
BF16 (head size 64) is cuDNN's fused SDPA (built with the backend graph API, deterministic
backward), with our FlashAttention-2 kernels on mma.sync as the fallback; elsewhere cuBLAS batched
matmuls around a masked softmax (llm.c's non-cuDNN path). The HC mixing kernels are templated on n
and work one warp per token; mHC's x @ phi products run on tensor cores with the rms terms fused,
the projection of sublayer k + 1 fused into the post-mix of sublayer k (at C <= 768 with the gates,
pre-mix and LayerNorm of k + 1 too, on rows kept in shared memory), the post-mix backward of
sublayer k - 1 into the dH pass of sublayer k (which forms H^k from H^{k-1} rather than read it),
the LayerNorm into the pre-mix and its backward into the pre-mix backward (u recomputed, not
stored), and the last sublayer's post-mix into the streams' sum (H^K is not stored). Variants side by side:
dev/cuda/bench_attention.cu, dev/cuda/bench_hc.cu; measurements and history: dev/NOTES.md.
*/
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>
#ifdef USE_MPI
#include <mpi.h>
#endif
#include <float.h>
#include <math.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <type_traits>
#include "llmc/utils.h"
#include "llmc/gpt_hc_formats.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/rand.h"
#include "llmc/model_common.h"
#include "llmc/params.h"

// ----------------------------------------------------------------------------
// precision and error checking

#if defined(ENABLE_FP32)
typedef float floatX;
#define CUBLAS_X CUDA_R_32F
#define PRECISION_NAME "fp32"
#else
typedef __nv_bfloat16 floatX;
#define CUBLAS_X CUDA_R_16BF
#define PRECISION_NAME "bf16"
#endif

static void cuda_check(cudaError_t e, const char *file, int line) {
    if (e != cudaSuccess) {
        if (e == cudaErrorMemoryAllocation) die("out of GPU memory [%s:%d] (try a smaller -b or -t)", file, line);
        die("CUDA: %s [%s:%d]", cudaGetErrorString(e), file, line);
    }
}
#define cudaCheck(x) cuda_check((x), __FILE__, __LINE__)
#define kernelCheck() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

static void nccl_check(ncclResult_t r, const char *file, int line) {
    if (r != ncclSuccess) die("NCCL: %s [%s:%d]", ncclGetErrorString(r), file, line);
}
#define ncclCheck(x) nccl_check((x), __FILE__, __LINE__)

static void cublas_check(cublasStatus_t s, const char *file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) die("cuBLAS error %d [%s:%d]", (int)s, file, line);
}
#define cublasCheck(x) cublas_check((x), __FILE__, __LINE__)

static cublasHandle_t g_cublas;
static cublasLtHandle_t g_cublaslt;
static void *g_lt_workspace;
#define LT_WORKSPACE (32 << 20)

__device__ __forceinline__ float tof(floatX x) { return (float)x; }

// 16-byte vectors of floatX for the memory-bound stream kernels (8 bf16 or 4 fp32 values)
#define X128 ((int)(16 / sizeof(floatX)))
struct alignas(16) x128 { floatX v[16 / sizeof(floatX)]; };
__device__ __forceinline__ x128 load128(const floatX *p) { return *reinterpret_cast<const x128 *>(p); }
__device__ __forceinline__ void store128(floatX *p, const x128 &v) { *reinterpret_cast<x128 *>(p) = v; }
__device__ __forceinline__ floatX tox(float x) { return (floatX)x; }
// fp32 sums of 16-byte vectors (the stream sums): s += v, and s rounded back to a vector
__device__ __forceinline__ void add128(float (&s)[X128], const x128 &v) {
#pragma unroll
    for (int e = 0; e < X128; e++) s[e] += tof(v.v[e]);
}
__device__ __forceinline__ x128 pack128(const float (&s)[X128]) {
    x128 o;
#pragma unroll
    for (int e = 0; e < X128; e++) o.v[e] = tox(s[e]);
    return o;
}

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// n elements of T on the device (out of memory ends with the one-line error)
template <typename T>
static T *dalloc(size_t n) {
    T *p;
    cudaCheck(cudaMalloc(&p, n * sizeof(T)));
    return p;
}

// opt-in time split (GPT_HC_PROFILE=1): events around each category, synchronized per scope,
// so it slows the run a little; the benchmark reports tok/s from a run without it
enum { PROF_MATMUL, PROF_ATTENTION, PROF_HC, PROF_HC_COEF, PROF_NORM, PROF_CLASSIFIER, PROF_OPTIMIZER, PROF_N };
static const char *PROF_NAMES[PROF_N] = {"matmul (cuBLAS)", "attention", "HC mixing", "HC coefficients", "layernorm", "softmax/xent", "optimizer"};
static double g_prof_ms[PROF_N];
static int g_prof = -1;
static int prof_on(void) {
    if (g_prof < 0) g_prof = getenv("GPT_HC_PROFILE") && atoi(getenv("GPT_HC_PROFILE")) > 0;
    return g_prof;
}
struct ProfScope {
    int cat;
    cudaEvent_t a, b;
    ProfScope(int c) : cat(c) {
        if (prof_on()) { cudaEventCreate(&a); cudaEventCreate(&b); cudaEventRecord(a); }
    }
    ~ProfScope() {
        if (prof_on()) {
            float ms;
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            cudaEventElapsedTime(&ms, a, b);
            g_prof_ms[cat] += ms;
            cudaEventDestroy(a);
            cudaEventDestroy(b);
        }
    }
};
static size_t g_peak_used = 0;
static void sample_memory(void) {
    size_t fr, tot;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess && tot - fr > g_peak_used) g_peak_used = tot - fr;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// block-wide sum of one value per thread (blockDim.x a multiple of 32, at most 1024)
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < (int)blockDim.x / 32; i++) s += sh[i];
    return s;
}


// ----------------------------------------------------------------------------
// several GPUs: data parallel over NCCL, one process per GPU (llm.c's multi-GPU design).
// Processes find each other through an NCCL unique id that rank 0 makes and hands to the others:
// by MPI_Bcast (-pi mpi, a build with USE_MPI), a file in a shared directory (-pi fs:DIR), a TCP
// connection to rank 0 (-pi tcp:HOST:PORT), or pipes when this program starts all ranks itself
// (-pn N without -pr). Each step's gradients are summed over the ranks (every rank's micro-batches
// are scaled so the sum is the mean); with ZeRO-1 (-pz 1) each rank receives the sum for its shard
// of the parameters only (reductions to the owner: a reduce-scatter in pieces), runs AdamW on that
// shard (AdamW moments exist for the shard alone), and an all-gather hands out the updated floatX
// weights. The sums overlap the last micro-batch's backward: each layer's gradients go to NCCL,
// on a stream of its own, as soon as the backward is past that layer, when the ranks span several
// machines (on one machine's NVLink it measured no faster: dev/NOTES.md; GPT_HC_OVERLAP=0/1
// overrides).

typedef struct {
    int rank, world, local_rank, zero;
    ncclComm_t comm;
    int mpi;               // MPI_Init was called
    double *dsum;          // device scratch for multi_sum
    cudaStream_t stream;   // NCCL's gradient reductions (non-blocking: they overlap the backward)
    cudaEvent_t ev;
    int overlap;           // sum each layer's gradients during the backward (see gpt_multi_init)
    int overlapped;        // the running backward has handed its layers to NCCL
} MultiGPU;
static MultiGPU g_multi = {0, 1, 0, 0, NULL, 0, NULL, NULL, NULL, 0, 0};
#define RENDEZVOUS_TIMEOUT_S 300

// the first of the variables that launchers (mpirun, srun) set, or -1
static int env_int(const char *a, const char *b, const char *c) {
    const char *names[3] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        const char *v = names[i] ? getenv(names[i]) : NULL;
        if (v && *v) return atoi(v);
    }
    return -1;
}

// rank 0 writes the id to DIR/gpt_hc_nccl_id (temp file, then rename); the others wait for a
// file written after they started (an older one is a crashed run's)
static void rendezvous_fs(const char *dir, ncclUniqueId *id, int rank) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/gpt_hc_nccl_id", dir);
    if (rank == 0) {
        snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
        FILE *fp = fopenCheck(tmp, "wb");
        fwriteCheck(id, sizeof(*id), 1, fp, tmp);
        fcloseCheck(fp, tmp);
        rename_check(tmp, path);
        return;
    }
    time_t start = time(NULL);
    for (;;) {
        struct stat st;
        if (stat(path, &st) == 0 && st.st_mtime >= start - 60 && st.st_size == (off_t)sizeof(*id)) {
            FILE *fp = fopenCheck(path, "rb");
            freadCheck(id, sizeof(*id), 1, fp, path);
            fclose(fp);
            return;
        }
        if (time(NULL) - start > RENDEZVOUS_TIMEOUT_S) die("-pi fs: no id from rank 0 in %s after %d s", path, RENDEZVOUS_TIMEOUT_S);
        usleep(100000);
    }
}

// rank 0 listens on PORT and sends the id to each of the world-1 others, who connect to HOST:PORT
static void rendezvous_tcp(const char *spec, ncclUniqueId *id, int rank, int world) {
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (colon == NULL || colon == spec || (size_t)(colon - spec) >= sizeof host || atoi(colon + 1) <= 0 || atoi(colon + 1) > 65535)
        die("-pi tcp:%s: expected tcp:HOST:PORT (HOST: rank 0's address)", spec);
    memcpy(host, spec, colon - spec);
    host[colon - spec] = '\0';
    const char *port = colon + 1;
    if (rank == 0) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons((uint16_t)atoi(port));
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, world) != 0)
            die("-pi tcp: rank 0 cannot listen on port %s (%s)", port, strerror(errno));
        for (int r = 1; r < world; r++) {
            struct pollfd pf = {fd, POLLIN, 0};
            if (poll(&pf, 1, RENDEZVOUS_TIMEOUT_S * 1000) <= 0) die("-pi tcp: %d of %d ranks connected to port %s in %d s", r - 1, world - 1, port, RENDEZVOUS_TIMEOUT_S);
            int c = accept(fd, NULL, NULL);
            if (c < 0 || send(c, id, sizeof(*id), 0) != (ssize_t)sizeof(*id)) die("-pi tcp: sending the id failed (%s)", strerror(errno));
            close(c);
        }
        close(fd);
        return;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0 || res == NULL) die("-pi tcp: cannot resolve host '%s'", host);
    time_t start = time(NULL);
    for (;;) {   // rank 0 may not be listening yet
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
            size_t got = 0;
            while (got < sizeof(*id)) {
                ssize_t r = recv(fd, (char *)id + got, sizeof(*id) - got, 0);
                if (r <= 0) die("-pi tcp: connection to %s closed before the id arrived", spec);
                got += (size_t)r;
            }
            close(fd);
            break;
        }
        if (fd >= 0) close(fd);
        if (time(NULL) - start > RENDEZVOUS_TIMEOUT_S) die("-pi tcp: rank 0 at %s did not answer in %d s", spec, RENDEZVOUS_TIMEOUT_S);
        usleep(200000);
    }
    freeaddrinfo(res);
}

// -pn N without -pr: fork N ranks on this machine, rank 0 passes the id down pipes; this process
// only waits, and when a rank fails it stops the others (they would wait in NCCL forever) and
// exits with that rank's status. Returns (in each child) its rank.
static int launch_local(int world, ncclUniqueId *id) {
    int (*fds)[2] = (int (*)[2])mallocCheck(world * sizeof(*fds));
    pid_t *pids = (pid_t *)mallocCheck(world * sizeof(pid_t));
    for (int r = 1; r < world; r++) if (pipe(fds[r]) != 0) die("pipe failed (%s)", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] < 0) die("fork failed (%s)", strerror(errno));
        if (pids[r] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);   // if the launcher is killed, so are the ranks
            g_die_rank = r;
            for (int q = 1; q < world; q++) {
                if (r != 0) close(fds[q][1]);
                if (q != r) close(fds[q][0]);
            }
            if (r == 0) {
                ncclCheck(ncclGetUniqueId(id));
                for (int q = 1; q < world; q++) {
                    if (write(fds[q][1], id, sizeof(*id)) != (ssize_t)sizeof(*id)) die("passing the NCCL id failed");
                    close(fds[q][1]);
                }
            } else {
                size_t got = 0;
                while (got < sizeof(*id)) {
                    ssize_t n = read(fds[r][0], (char *)id + got, sizeof(*id) - got);
                    if (n <= 0) exit(1);   // rank 0 failed before handing out the id; it says why
                    got += (size_t)n;
                }
                close(fds[r][0]);
            }
            free(fds);
            free(pids);
            return r;
        }
    }
    for (int q = 1; q < world; q++) { close(fds[q][0]); close(fds[q][1]); }
    int rc = 0, alive = world;
    while (alive > 0) {
        int st;
        pid_t p = wait(&st);
        if (p < 0) break;
        alive--;
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (code != 0 && rc == 0) {
            rc = code;
            for (int r = 0; r < world; r++) if (pids[r] != p) kill(pids[r], SIGTERM);
        }
    }
    exit(rc);
}

// sets *world and *rank (from the flags, or from mpirun/srun's variables), picks this rank's GPU
// and joins the NCCL communicator; a single process (world 1) only picks GPU 0
static void gpt_multi_init(int *world, int *rank, int gpus_per_node, const char *rendezvous, int zero) {
    int env_world = env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS");
    int env_rank = env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID");
    int env_local = env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID");
    int use_mpi = rendezvous != NULL && strcmp(rendezvous, "mpi") == 0;
    if (rendezvous == NULL && env_world > 1 && *rank < 0) {   // started by mpirun or srun
#ifdef USE_MPI
        use_mpi = 1;
#else
        die("started by a launcher with %d processes, but this build has no MPI (make USE_MPI=1): give -pi fs:DIR or tcp:HOST:PORT", env_world);
#endif
    }
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (use_mpi) {
#ifdef USE_MPI
        int w, r;
        if (MPI_Init(NULL, NULL) != MPI_SUCCESS) die("MPI_Init failed");
        g_multi.mpi = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &w);
        MPI_Comm_rank(MPI_COMM_WORLD, &r);
        if (*world > 0 && *world != w) die("-pn %d but MPI started %d processes", *world, w);
        if (*rank >= 0 && *rank != r) die("-pr %d but MPI says this is rank %d", *rank, r);
        *world = w;
        *rank = r;
        g_die_rank = w > 1 ? r : -1;
        if (r == 0) ncclCheck(ncclGetUniqueId(&id));
        if (MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) die("MPI_Bcast of the NCCL id failed");
#else
        die("-pi mpi: this build has no MPI (make USE_MPI=1 where MPI is installed); use fs:DIR or tcp:HOST:PORT");
#endif
    } else {
        if (*world == 0) *world = env_world > 0 ? env_world : 1;
        if (*rank < 0 && env_rank >= 0 && rendezvous != NULL) *rank = env_rank;
        if (*rank >= *world) die("-pr %d out of range for -pn %d", *rank, *world);
        if (rendezvous != NULL && strncmp(rendezvous, "fs:", 3) != 0 && strncmp(rendezvous, "tcp:", 4) != 0)
            die("-pi %s: expected mpi, fs:DIR or tcp:HOST:PORT", rendezvous);
        if (*world > 1 && *rank < 0) {
            if (rendezvous != NULL) die("-pi %s needs -pr (this process's rank); without -pr and -pi, -pn %d starts every rank here", rendezvous, *world);
            *rank = launch_local(*world, &id);
            env_local = *rank;
        } else if (*world > 1) {
            if (rendezvous == NULL) die("-pn %d -pr %d: give -pi fs:DIR or tcp:HOST:PORT so the processes can meet", *world, *rank);
            g_die_rank = *rank;
            if (*rank == 0) ncclCheck(ncclGetUniqueId(&id));
            if (strncmp(rendezvous, "fs:", 3) == 0) rendezvous_fs(rendezvous + 3, &id, *rank);
            else rendezvous_tcp(rendezvous + 4, &id, *rank, *world);
        }
        if (*rank < 0) *rank = 0;
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) die("no CUDA device found (%s); use ./train_gpt_hc on the CPU", cudaGetErrorString(e));
    int local = gpus_per_node > 0 ? *rank % gpus_per_node : (env_local >= 0 ? env_local : *rank % count);
    if (local >= count) die("rank %d wants GPU %d but this machine has %d GPUs (-pg)", *rank, local, count);
    cudaCheck(cudaSetDevice(local));
    g_multi.rank = *rank;
    g_multi.world = *world;
    g_multi.local_rank = local;
    g_multi.zero = *world > 1 ? zero : 0;
    const char *ov = getenv("GPT_HC_OVERLAP");
    g_multi.overlap = ov && *ov ? atoi(ov) != 0 : *world > (gpus_per_node > 0 ? gpus_per_node : count);
    if (*world > 1) {
        ncclCheck(ncclCommInitRank(&g_multi.comm, *world, id, *rank));
        cudaCheck(cudaMalloc(&g_multi.dsum, 64 * sizeof(double)));
        cudaCheck(cudaStreamCreateWithFlags(&g_multi.stream, cudaStreamNonBlocking));
        cudaCheck(cudaEventCreateWithFlags(&g_multi.ev, cudaEventDisableTiming));
        // every rank is in: the id file is no longer needed
        if (*rank == 0 && rendezvous != NULL && strncmp(rendezvous, "fs:", 3) == 0) {
            char path[4096];
            snprintf(path, sizeof path, "%s/gpt_hc_nccl_id", rendezvous + 3);
            unlink(path);   // ncclCommInitRank returned: every rank has read it
        }
    }
}

// ----------------------------------------------------------------------------
// scratch device memory (grown on demand)

// slot 4: the side stream's (see matmul_backward); 5: the backward boundary kernel's parts, which
// the coefficient stream reduces; 6: the coefficient stream's own (see coef_begin); 7: the mHC/dHC
// backward's per-token rows and dphi sums, which the coefficient stream turns into parameter
// gradients while the main stream goes on (see hc_coeffs_backward)
static void *g_dscratch[8];
static size_t g_dscratch_size[8];
static void *dscratch(int slot, size_t bytes) {
    if (g_dscratch_size[slot] < bytes) {
        if (g_dscratch[slot]) cudaCheck(cudaFree(g_dscratch[slot]));
        cudaCheck(cudaMalloc(&g_dscratch[slot], bytes));
        g_dscratch_size[slot] = bytes;
    }
    return g_dscratch[slot];
}

// ----------------------------------------------------------------------------
// column sums in a fixed order: out[c] += sum_r f(r, c), rows split into chunks, each chunk's
// partial written by one thread, then the chunks summed in order

#define COLSUM_CHUNKS 64

template <typename T>
__global__ void colsum_partial_kernel(float *partial, const T *x, int R, int Ccols, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y;
    if (c >= Ccols) return;
    float s = 0.0f;
    int r1 = min(R, (ch + 1) * chunk);
    for (int r = ch * chunk; r < r1; r++) s += (float)x[(size_t)r * Ccols + c];
    partial[(size_t)ch * Ccols + c] = s;
}

// block (32, 16): 32 columns, each summed by 16 threads over interleaved chunks, then the 16 added in
// a fixed order. One thread per column walking all chunks serially took 12-33 us per call (ncu):
// for the narrow HC rows that was 1 block of 34 threads over 1024 chunks
#define COLSUM_FY 16
// with out2: columns from split on go to out2[c - split]
__global__ void __launch_bounds__(32 * COLSUM_FY) colsum_finish_kernel(float *out, const float *partial, int Ccols, int nchunks,
                                                                       float *out2 = NULL, int split = 0) {
    __shared__ float sm[COLSUM_FY][33];
    int c = blockIdx.x * 32 + threadIdx.x, y = threadIdx.y;
    float s = 0.0f;
    if (c < Ccols)
#pragma unroll 4
        for (int ch = y; ch < nchunks; ch += COLSUM_FY) s += partial[(size_t)ch * Ccols + c];
    sm[y][threadIdx.x] = s;
    __syncthreads();
    if (y == 0 && c < Ccols) {
        float t = 0.0f;
#pragma unroll
        for (int j = 0; j < COLSUM_FY; j++) t += sm[j][threadIdx.x];
        if (out2 && c >= split) out2[c - split] += t;
        else out[c] += t;
    }
}

// floatX matrices (the bias gradients): 16-byte loads, each thread summing 8 (bf16) adjacent
// columns over a chunk of rows, many chunks so the whole GPU streams the matrix
#define COLSUM_VCHUNKS 256
__global__ void colsum_partial_vec_kernel(float *partial, const floatX *x, int R, int Ccols, int chunk) {
    int cg = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y;
    if (cg * X128 >= Ccols) return;
    float s[X128];
#pragma unroll
    for (int e = 0; e < X128; e++) s[e] = 0.0f;
    int r1 = min(R, (ch + 1) * chunk);
#pragma unroll 4
    for (int r = ch * chunk; r < r1; r++) {
        x128 v = load128(x + (size_t)r * Ccols + cg * X128);
#pragma unroll
        for (int e = 0; e < X128; e++) s[e] += tof(v.v[e]);
    }
#pragma unroll
    for (int e = 0; e < X128; e++) partial[(size_t)ch * Ccols + cg * X128 + e] = s[e];
}

template <typename T>
static void colsum(float *out, const T *x, int R, int Ccols, cudaStream_t stream = 0, int slot = 3) {
    if (std::is_same<T, floatX>::value && Ccols % X128 == 0) {
        int chunk = (R + COLSUM_VCHUNKS - 1) / COLSUM_VCHUNKS;
        float *partial = (float *)dscratch(slot, (size_t)COLSUM_VCHUNKS * Ccols * sizeof(float));
        colsum_partial_vec_kernel<<<dim3(ceil_div(Ccols / X128, 128), COLSUM_VCHUNKS), 128, 0, stream>>>(partial, (const floatX *)x, R, Ccols, chunk);
        kernelCheck();
        colsum_finish_kernel<<<ceil_div(Ccols, 32), dim3(32, COLSUM_FY), 0, stream>>>(out, partial, Ccols, COLSUM_VCHUNKS);
        kernelCheck();
        return;
    }
    // narrow matrices (the HC per-token rows) get more chunks, so enough threads stream them
    int nchunks = Ccols >= 256 ? COLSUM_CHUNKS : 1024, chunk = (R + nchunks - 1) / nchunks;
    nchunks = (R + chunk - 1) / chunk;
    float *partial = (float *)dscratch(slot, (size_t)nchunks * Ccols * sizeof(float));
    int threads = Ccols >= 256 ? 256 : (Ccols + 31) / 32 * 32;
    colsum_partial_kernel<<<dim3(ceil_div(Ccols, threads), nchunks), threads, 0, stream>>>(partial, x, R, Ccols, chunk);
    kernelCheck();
    colsum_finish_kernel<<<ceil_div(Ccols, 32), dim3(32, COLSUM_FY), 0, stream>>>(out, partial, Ccols, nchunks);
    kernelCheck();
}

// ----------------------------------------------------------------------------
// base transformer kernels

// H^0_i = wte[tok] + wpe[t] for every stream i; one warp per token, 16 bytes a lane (C % X128 == 0)
__global__ void encoder_forward_kernel(floatX *H, const int *inp, const floatX *wte, const floatX *wpe, int BT, int T, int C, int n) {
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    const floatX *we = wte + (size_t)inp[bt] * C, *pe = wpe + (size_t)(bt % T) * C;
    for (int c = lane * X128; c < C; c += 32 * X128) {
        x128 a = load128(we + c), b = load128(pe + c), v;
#pragma unroll
        for (int e = 0; e < X128; e++) v.v[e] = tox(tof(a.v[e]) + tof(b.v[e]));
        for (int i = 0; i < n; i++) store128(H + ((size_t)bt * n + i) * C + c, v);
    }
}

// dwte[tok] += sum over the token's positions of sum_i dH^0_i. The positions are bucketed by token
// id on the host (in order) and each bucket cut into chunks of at most WTE_CHUNK positions, one
// block column per chunk: a bucket of one chunk adds into dwte directly, a longer one (frequent
// tokens, hundreds of positions: as one serial chain of loads this took 20-50x its memory time)
// writes its chunk sums to partial slots that wte_backward_finish_kernel adds in order. No two
// threads add into the same row and the order is fixed: deterministic.
#define WTE_CHUNK 32
static int g_wte_chunk = WTE_CHUNK;   // the CUDA test sets 1 so that short buckets take the multi-chunk path too
__global__ void wte_backward_kernel(float *dwte, float *partial, const floatX *dH, const int *chunks, const int *positions, int n, int C) {
    const int *ch = chunks + 4 * blockIdx.x;   // token, first position, end, partial slot (-1: add directly)
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int j = ch[1], j1 = ch[2];
    for (; j + 4 <= j1; j += 4)
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const floatX *d = dH + (size_t)positions[j + u] * n * C + c;
            for (int i = 0; i < n; i++) s[u] += tof(d[(size_t)i * C]);
        }
    for (; j < j1; j++) {
        const floatX *d = dH + (size_t)positions[j] * n * C + c;
        for (int i = 0; i < n; i++) s[0] += tof(d[(size_t)i * C]);
    }
    float v = (s[0] + s[1]) + (s[2] + s[3]);
    if (ch[3] < 0) dwte[(size_t)ch[0] * C + c] += v;
    else partial[(size_t)ch[3] * C + c] = v;
}

// per multi-chunk bucket (token, first slot, slot count): dwte[token] += its partials in order
__global__ void wte_backward_finish_kernel(float *dwte, const float *partial, const int *multi, int C) {
    const int *mb = multi + 3 * blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < mb[2]; k++) s += partial[(size_t)(mb[1] + k) * C + c];
    dwte[(size_t)mb[0] * C + c] += s;
}

__global__ void wpe_backward_kernel(float *dwpe, const floatX *dH, int B, int T, int n, int C) {
    int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < n; i++) s += tof(dH[(((size_t)b * T + t) * n + i) * C + c]);
    dwpe[(size_t)t * C + c] += s;
}

// one block per row
__global__ void layernorm_forward_kernel(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w, const floatX *b, int C) {
    int r = blockIdx.x;
    const floatX *x = inp + (size_t)r * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += tof(x[i]);
    float m = block_sum(s) / C;
    float v = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float d = tof(x[i]) - m; v += d * d; }
    float rs = rsqrtf(block_sum(v) / C + 1e-5f);
    for (int i = threadIdx.x; i < C; i += blockDim.x) out[(size_t)r * C + i] = tox((tof(x[i]) - m) * rs * tof(w[i]) + tof(b[i]));
    if (threadIdx.x == 0) { mean[r] = m; rstd[r] = rs; }
}

// dinp += ...; also writes xhat*dout into scratch for the weight gradient
__global__ void layernorm_backward_kernel(floatX *dinp, float *dw_rows, const floatX *dout, const floatX *inp,
                                          const floatX *w, const float *mean, const float *rstd, int C) {
    int r = blockIdx.x;
    const floatX *d = dout + (size_t)r * C, *x = inp + (size_t)r * C;
    float m = mean[r], s = rstd[r], a = 0.0f, bsum = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float dn = tof(w[i]) * tof(d[i]);
        a += dn;
        bsum += dn * (tof(x[i]) - m) * s;
    }
    float dn_mean = block_sum(a) / C, dn_xhat = block_sum(bsum) / C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float xhat = (tof(x[i]) - m) * s;
        size_t q = (size_t)r * C + i;
        dinp[q] = tox(tof(dinp[q]) + s * (tof(w[i]) * tof(d[i]) - dn_mean - xhat * dn_xhat));
        dw_rows[q] = tof(d[i]) * xhat;
    }
}

__global__ void add_kernel(floatX *out, const floatX *a, const floatX *b, size_t N) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) out[i] = tox(tof(a[i]) + tof(b[i]));
}

// the rest of a LayerNorm row held by a warp in registers (lane's chunks lane + 32 j, s its sum of
// their values): mean, variance, the normalized row to out, mean and rstd
template <int NV>
__device__ __forceinline__ void ln_row_finish(const x128 (&v)[NV], float s, int C, const floatX *w, const floatX *b, floatX *out, float *mean,
                                              float *rstd, int lane) {
    int nv = C / X128;
    float m = warp_sum(s) / C, var = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; j++)
        if (lane + 32 * j < nv)
#pragma unroll
            for (int e = 0; e < X128; e++) { float d = tof(v[j].v[e]) - m; var += d * d; }
    float rs = rsqrtf(warp_sum(var) / C + 1e-5f);
#pragma unroll
    for (int j = 0; j < NV; j++) {
        int i = lane + 32 * j;
        if (i < nv) {
            x128 wv = load128(w + i * X128), bv = load128(b + i * X128), o;
#pragma unroll
            for (int e = 0; e < X128; e++) o.v[e] = tox((tof(v[j].v[e]) - m) * rs * tof(wv.v[e]) + tof(bv.v[e]));
            store128(out + i * X128, o);
        }
    }
    if (lane == 0) { *mean = m; *rstd = rs; }
}

// The LayerNorms of the step: one warp per row, each lane holding NV 16-byte chunks of the row in
// registers (C <= 32 * 8 * X128; wider rows take the block-per-row kernels above)
// With inp2, the input is inp + inp2 (rounded to floatX), also stored to sum: the residual add
// and the next LayerNorm in one pass
template <int NV>
__global__ void layernorm_forward_vec_kernel(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w, const floatX *b,
                                             int N, int C, const floatX *inp2, floatX *sum) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, nv = C / X128;
    if (r >= N) return;
    const floatX *x = inp + (size_t)r * C;
    x128 v[NV];
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; j++) {
        int i = lane + 32 * j;
        if (i < nv) {
            v[j] = load128(x + i * X128);
            if (inp2) {
                x128 v2 = load128(inp2 + (size_t)r * C + i * X128);
#pragma unroll
                for (int e = 0; e < X128; e++) v[j].v[e] = tox(tof(v[j].v[e]) + tof(v2.v[e]));
                store128(sum + (size_t)r * C + i * X128, v[j]);
            }
#pragma unroll
            for (int e = 0; e < X128; e++) s += tof(v[j].v[e]);
        }
    }
    ln_row_finish<NV>(v, s, C, w, b, out + (size_t)r * C, mean + r, rstd + r, lane);
}

// a LayerNorm backward row, one 16-byte chunk at a time: pass 1 adds the chunk to the row sums of
// w dout (a) and w dout xhat (bs); pass 2 gives each input gradient from their means
__device__ __forceinline__ void ln_bwd_chunk_sums(float &a, float &bs, const x128 &wv, const x128 &dv, const x128 &xv, float m, float s) {
#pragma unroll
    for (int e = 0; e < X128; e++) {
        float dn = tof(wv.v[e]) * tof(dv.v[e]);
        a += dn;
        bs += dn * (tof(xv.v[e]) - m) * s;
    }
}
__device__ __forceinline__ float ln_bwd_dx(float w, float g, float xhat, float s, float dn_mean, float dn_xhat) {
    return s * (w * g - dn_mean - xhat * dn_xhat);
}

// dinp += the LayerNorm input gradient (dinp = dres + it, with dres); the weight and bias gradients are summed per block in
// registers and then across the block's warps in a fixed order, into partial[block][2C]: rows are
// dealt to blocks by index, so the sums do not depend on scheduling (deterministic)
#define LN_BWD_WARPS 8
template <int NV>
__global__ void __launch_bounds__(32 * LN_BWD_WARPS) layernorm_backward_vec_kernel(floatX *dinp, float *partial, const floatX *dout,
                                                                                   const floatX *inp, const floatX *w, const float *mean,
                                                                                   const float *rstd, int N, int C, const floatX *dres, int write) {
    extern __shared__ float ln_acc[];   // [2C]: dw then db
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nv = C / X128;
    float dw[NV][X128], db[NV][X128];
#pragma unroll
    for (int j = 0; j < NV; j++)
#pragma unroll
        for (int e = 0; e < X128; e++) dw[j][e] = db[j][e] = 0.0f;
    for (int r = blockIdx.x * LN_BWD_WARPS + warp; r < N; r += gridDim.x * LN_BWD_WARPS) {
        const floatX *d = dout + (size_t)r * C, *x = inp + (size_t)r * C;
        float m = mean[r], s = rstd[r], a = 0.0f, bs = 0.0f;
        x128 dv[NV], xv[NV];
#pragma unroll
        for (int j = 0; j < NV; j++) {
            int i = lane + 32 * j;
            if (i < nv) {
                dv[j] = load128(d + i * X128);
                xv[j] = load128(x + i * X128);
                ln_bwd_chunk_sums(a, bs, load128(w + i * X128), dv[j], xv[j], m, s);
            }
        }
        float dn_mean = warp_sum(a) / C, dn_xhat = warp_sum(bs) / C;
#pragma unroll
        for (int j = 0; j < NV; j++) {
            int i = lane + 32 * j;
            if (i < nv) {
                x128 wv = load128(w + i * X128), gv;
                if (write) {
#pragma unroll
                    for (int e = 0; e < X128; e++) gv.v[e] = tox(0.0f);
                } else {
                    gv = load128((dres ? dres : dinp) + (size_t)r * C + i * X128);
                }
#pragma unroll
                for (int e = 0; e < X128; e++) {
                    float xhat = (tof(xv[j].v[e]) - m) * s, g = tof(dv[j].v[e]);
                    gv.v[e] = tox(tof(gv.v[e]) + ln_bwd_dx(tof(wv.v[e]), g, xhat, s, dn_mean, dn_xhat));
                    dw[j][e] += g * xhat;
                    db[j][e] += g;
                }
                store128(dinp + (size_t)r * C + i * X128, gv);
            }
        }
    }
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) ln_acc[i] = 0.0f;
    __syncthreads();
    for (int ww = 0; ww < LN_BWD_WARPS; ww++) {   // warps add in order
        if (warp == ww)
#pragma unroll
            for (int j = 0; j < NV; j++) {
                int i = lane + 32 * j;
                if (i < nv)
#pragma unroll
                    for (int e = 0; e < X128; e++) { ln_acc[i * X128 + e] += dw[j][e]; ln_acc[C + i * X128 + e] += db[j][e]; }
            }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) partial[(size_t)blockIdx.x * 2 * C + i] = ln_acc[i];
}

// dw[c] += sum over blocks of partial[.][c], db likewise (partial's columns C..2C): colsum_finish_kernel's
// fixed order. One thread per column walking the 256 blocks serially took 12 us per call (ncu: 6
// blocks on a 132-SM GPU), on the backward's critical path once per sublayer
static void layernorm_param_finish(float *dw, float *db, const float *partial, int C, int nblocks) {
    colsum_finish_kernel<<<ceil_div(2 * C, 32), dim3(32, COLSUM_FY)>>>(dw, partial, 2 * C, nblocks, db, C);
    kernelCheck();
}

// launch KERNEL<n>, n = 1..8 (the expansion rate, or the LayerNorm's 16-byte vectors per lane), with
// SMEM bytes of dynamic shared memory, on STREAM
#define DISPATCH_N_SS(n, KERNEL, GRID, BLOCK, SMEM, STREAM, ...)                  \
    do {                                                                          \
        switch (n) {                                                              \
            case 1: KERNEL<1><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 2: KERNEL<2><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 3: KERNEL<3><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 4: KERNEL<4><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 5: KERNEL<5><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 6: KERNEL<6><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 7: KERNEL<7><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            case 8: KERNEL<8><<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__); break; \
            default: die("internal: template parameter %d is not compiled in (1..8)", (int)(n)); \
        }                                                                         \
        kernelCheck();                                                            \
    } while (0)
#define DISPATCH_N_SMEM(n, KERNEL, GRID, BLOCK, SMEM, ...) DISPATCH_N_SS(n, KERNEL, GRID, BLOCK, SMEM, 0, __VA_ARGS__)
#define DISPATCH_N_STREAM(n, KERNEL, GRID, BLOCK, STREAM, ...) DISPATCH_N_SS(n, KERNEL, GRID, BLOCK, 0, STREAM, __VA_ARGS__)
#define DISPATCH_N(n, KERNEL, GRID, BLOCK, ...) DISPATCH_N_SMEM(n, KERNEL, GRID, BLOCK, 0, __VA_ARGS__)
#define LN_DISPATCH(nv, KERNEL, GRID, BLOCK, SMEM, ...) DISPATCH_N_SMEM(nv, KERNEL, GRID, BLOCK, SMEM, __VA_ARGS__)

// out = LayerNorm(inp), or with inp2: sum = inp + inp2 and out = LayerNorm(sum)
static void layernorm_forward(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w, const floatX *b, int N, int C,
                              const floatX *inp2 = NULL, floatX *sum = NULL) {
    ProfScope prof(PROF_NORM);
    int nv = ceil_div(C / X128, 32);
    if (nv <= 8) {
        LN_DISPATCH(nv, layernorm_forward_vec_kernel, ceil_div(N, 8), 256, 0, out, mean, rstd, inp, w, b, N, C, inp2, sum);
    } else {
        if (inp2) {
            add_kernel<<<ceil_div((size_t)N * C, 256), 256>>>(sum, inp, inp2, (size_t)N * C);
            inp = sum;
        }
        layernorm_forward_kernel<<<N, 256>>>(out, mean, rstd, inp, w, b, C);
    }
    kernelCheck();
}

// dinp += d(LayerNorm input) (or dinp = dres + d(LayerNorm input)); dw, db += the parameter gradients
// dinp += dx, or with dres dinp = dres + dx, or with write dinp = dx (no read of dinp: an HC sublayer
// input's gradient, which needed a memset of 25 MB per d12 sublayer before)
static void layernorm_backward(floatX *dinp, float *dw, float *db, const floatX *dout, const floatX *inp, const floatX *w,
                               const float *mean, const float *rstd, int N, int C, const floatX *dres = NULL, int write = 0) {
    ProfScope prof(PROF_NORM);
    int nv = ceil_div(C / X128, 32);
    if (nv <= 8) {
        int nblocks = (int)min((unsigned)256, ceil_div(N, LN_BWD_WARPS * 4));   // a function of N only: same sums on any GPU
        float *partial = (float *)dscratch(3, (size_t)nblocks * 2 * C * sizeof(float));
        LN_DISPATCH(nv, layernorm_backward_vec_kernel, nblocks, 32 * LN_BWD_WARPS, 2 * C * sizeof(float), dinp, partial, dout, inp, w, mean,
                    rstd, N, C, dres, write);
        kernelCheck();
        layernorm_param_finish(dw, db, partial, C, nblocks);
    } else {
        if (dres) cudaCheck(cudaMemcpy(dinp, dres, (size_t)N * C * sizeof(floatX), cudaMemcpyDeviceToDevice));
        else if (write) cudaCheck(cudaMemset(dinp, 0, (size_t)N * C * sizeof(floatX)));
        float *dwrows = (float *)dscratch(2, (size_t)N * C * sizeof(float));
        layernorm_backward_kernel<<<N, 256>>>(dinp, dwrows, dout, inp, w, mean, rstd, C);
        kernelCheck();
        colsum(dw, dwrows, N, C);
        colsum(db, dout, N, C);
    }
    kernelCheck();
}


// (B,T,3C) -> q, k, v each (B,NH,T,hs)
__global__ void permute_kernel(floatX *q, floatX *k, floatX *v, const floatX *qkv, int B, int T, int NH, int hs) {
    int bt = blockIdx.x, b = bt / T, t = bt % T, C = NH * hs;   // one block per token
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        int h = c / hs, d = c % hs;
        size_t src = (size_t)bt * 3 * C + c, dst = (((size_t)b * NH + h) * T + t) * hs + d;
        q[dst] = qkv[src];
        k[dst] = qkv[src + C];
        v[dst] = qkv[src + 2 * C];
    }
}

__global__ void permute_backward_kernel(floatX *dqkv, const floatX *dq, const floatX *dk, const floatX *dv, int B, int T, int NH, int hs) {
    int bt = blockIdx.x, b = bt / T, t = bt % T, C = NH * hs;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        int h = c / hs, d = c % hs;
        size_t dst = (size_t)bt * 3 * C + c, src = (((size_t)b * NH + h) * T + t) * hs + d;
        dqkv[dst] = dq[src];
        dqkv[dst + C] = dk[src];
        dqkv[dst + 2 * C] = dv[src];
    }
}

// (B,NH,T,hs) -> (B,T,C)
__global__ void unpermute_kernel(floatX *out, const floatX *y, int B, int T, int NH, int hs, int backward) {
    int bt = blockIdx.x, b = bt / T, t = bt % T, C = NH * hs;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        int h = c / hs, d = c % hs;
        size_t o = (size_t)bt * C + c, p = (((size_t)b * NH + h) * T + t) * hs + d;
        if (backward) out[p] = y[o];   // (B,T,C) -> (B,NH,T,hs)
        else out[o] = y[p];
    }
}

// causal softmax of scale * preatt, one block per row (b, h, t)
__global__ void softmax_forward_kernel(floatX *att, const floatX *preatt, int T, float scale) {
    size_t row = blockIdx.x;
    int t = row % T;
    const floatX *p = preatt + row * T;
    floatX *a = att + row * T;
    float mx = -FLT_MAX;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) mx = fmaxf(mx, scale * tof(p[i]));
    __shared__ float shm[32];
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    if (threadIdx.x % 32 == 0) shm[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = -FLT_MAX;
    for (int i = 0; i < (int)blockDim.x / 32; i++) mx = fmaxf(mx, shm[i]);
    float s = 0.0f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) s += expf(scale * tof(p[i]) - mx);
    s = block_sum(s);
    for (int i = threadIdx.x; i < T; i += blockDim.x) a[i] = tox(i <= t ? expf(scale * tof(p[i]) - mx) / s : 0.0f);
}

// dpreatt = scale * att * (datt - sum(att * datt))
__global__ void softmax_backward_kernel(floatX *dpreatt, const floatX *datt, const floatX *att, int T, float scale) {
    size_t row = blockIdx.x;
    int t = row % T;
    const floatX *a = att + row * T, *d = datt + row * T;
    float s = 0.0f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) s += tof(a[i]) * tof(d[i]);
    s = block_sum(s);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        dpreatt[row * T + i] = tox(i <= t ? scale * tof(a[i]) * (tof(d[i]) - s) : 0.0f);
}

// block-wide (max, sum of exp) of per-thread online-softmax pairs
__device__ void block_max_sum(float &m, float &s) {
    __shared__ float shm[32], shs[32];
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        float M = fmaxf(m, m2);
        s = (m == -FLT_MAX ? 0.0f : s * expf(m - M)) + (m2 == -FLT_MAX ? 0.0f : s2 * expf(m2 - M));
        m = M;
    }
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) { shm[w] = m; shs[w] = s; }
    __syncthreads();
    m = -FLT_MAX;
    s = 0.0f;
    for (int i = 0; i < (int)blockDim.x / 32; i++) {
        float M = fmaxf(m, shm[i]);
        s = (m == -FLT_MAX ? 0.0f : s * expf(m - M)) + (shm[i] == -FLT_MAX ? 0.0f : shs[i] * expf(shm[i] - M));
        m = M;
    }
}

// per row of logits (one block): logsumexp over the first V columns in one pass (16-byte
// loads, online max), kept for the backward; and the loss of the target
// with dlogits: also writes the unscaled gradient softmax - onehot (zero in the padded columns) in a
// second pass over the row, which is still in L2: the backward's separate read of the logits
// (1.6 GB at d12) is gone; matmul_backward applies the loss scale as its alpha
__global__ void classifier_forward_kernel(float *losses, float *lse, floatX *dlogits, const floatX *logits, const int *targets, int V, int Vp) {
    size_t r = blockIdx.x;
    const floatX *l = logits + r * Vp;
    float m = -FLT_MAX, s = 0.0f;
    for (int i = threadIdx.x * X128; i < Vp; i += blockDim.x * X128) {
        x128 v = load128(l + i);
        float cm = -FLT_MAX;
#pragma unroll
        for (int e = 0; e < X128; e++) if (i + e < V) cm = fmaxf(cm, tof(v.v[e]));
        if (cm == -FLT_MAX) continue;
        float M = fmaxf(m, cm);
        s = (m == -FLT_MAX ? 0.0f : s * expf(m - M));
#pragma unroll
        for (int e = 0; e < X128; e++) if (i + e < V) s += expf(tof(v.v[e]) - M);
        m = M;
    }
    block_max_sum(m, s);
    float z = m + logf(s);
    if (threadIdx.x == 0) {
        lse[r] = z;
        losses[r] = z - tof(l[targets[r]]);
    }
    if (dlogits == NULL) return;
    int tgt = targets[r];
    for (int i = threadIdx.x * X128; i < Vp; i += blockDim.x * X128) {
        x128 v = load128(l + i), o;
#pragma unroll
        for (int e = 0; e < X128; e++) {
            int idx = i + e;
            float p = idx < V ? expf(tof(v.v[e]) - z) : 0.0f;
            o.v[e] = tox(p - (idx == tgt ? 1.0f : 0.0f));
        }
        store128(dlogits + r * Vp + i, o);
    }
}

// causal softmax rows with 16-byte accesses (T % X128 == 0); entries past t are neither read
// nor exponentiated, only zero-filled
__global__ void softmax_forward_vec_kernel(floatX *att, const floatX *preatt, int T, float scale) {
    size_t row = blockIdx.x;
    int t = row % T;
    const floatX *p = preatt + row * T;
    floatX *a = att + row * T;
    float m = -FLT_MAX, s = 0.0f;
    for (int i = threadIdx.x * X128; i <= t; i += blockDim.x * X128) {
        x128 v = load128(p + i);
        float cm = -FLT_MAX;
#pragma unroll
        for (int e = 0; e < X128; e++) if (i + e <= t) cm = fmaxf(cm, scale * tof(v.v[e]));
        float M = fmaxf(m, cm);
        s = (m == -FLT_MAX ? 0.0f : s * expf(m - M));
#pragma unroll
        for (int e = 0; e < X128; e++) if (i + e <= t) s += expf(scale * tof(v.v[e]) - M);
        m = M;
    }
    block_max_sum(m, s);
    float inv = 1.0f / s;
    for (int i = threadIdx.x * X128; i < T; i += blockDim.x * X128) {
        x128 o;
        if (i > t) {
#pragma unroll
            for (int e = 0; e < X128; e++) o.v[e] = tox(0.0f);
        } else {
            x128 v = load128(p + i);
#pragma unroll
            for (int e = 0; e < X128; e++) o.v[e] = tox(i + e <= t ? expf(scale * tof(v.v[e]) - m) * inv : 0.0f);
        }
        store128(a + i, o);
    }
}

__global__ void softmax_backward_vec_kernel(floatX *dpreatt, const floatX *datt, const floatX *att, int T, float scale) {
    size_t row = blockIdx.x;
    int t = row % T;
    const floatX *a = att + row * T, *d = datt + row * T;
    float dot = 0.0f;
    for (int i = threadIdx.x * X128; i <= t; i += blockDim.x * X128) {
        x128 av = load128(a + i), dv = load128(d + i);
#pragma unroll
        for (int e = 0; e < X128; e++) dot += tof(av.v[e]) * tof(dv.v[e]);   // att is 0 past t
    }
    dot = block_sum(dot);
    for (int i = threadIdx.x * X128; i < T; i += blockDim.x * X128) {
        x128 o;
        if (i > t) {
#pragma unroll
            for (int e = 0; e < X128; e++) o.v[e] = tox(0.0f);
        } else {
            x128 av = load128(a + i), dv = load128(d + i);
#pragma unroll
            for (int e = 0; e < X128; e++) o.v[e] = tox(scale * tof(av.v[e]) * (tof(dv.v[e]) - dot));
        }
        store128(dpreatt + row * T + i, o);
    }
}

// dlogits = (softmax - onehot) * dloss from the stored logsumexp: one pass; padded columns 0
// ----------------------------------------------------------------------------
// matmuls through cuBLAS (row-major tensors seen as column-major transposes)

// cuBLASLt matmul with an epilogue, column-major: D (m x n) = op(A) (m x k) @ op(B) (k x n).
// epilogue: CUBLASLT_EPILOGUE_DEFAULT, _BIAS (bias, m), _GELU_AUX_BIAS (aux = GELU input, m x n),
// or _DGELU (D *= GELU'(aux)). Descriptors are made per call (a few microseconds, as in llm.c).
static void matmul_lt(floatX *d, const floatX *a, const floatX *b, const floatX *bias, floatX *aux, int m, int n, int k,
                      bool transA, bool transB, cublasLtEpilogue_t epilogue, float alpha = 1.0f) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof(opA)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof(opB)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias != NULL) {
        cudaDataType_t bt = CUBLAS_X;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    if (aux != NULL) {
        int64_t aux_ld = m;
        cudaDataType_t at = CUBLAS_X;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &at, sizeof(at)));
    }
    cublasCheck(cublasLtMatrixLayoutCreate(&la, CUBLAS_X, transA ? k : m, transA ? m : k, transA ? k : m));
    cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUBLAS_X, transB ? n : k, transB ? k : n, transB ? n : k));
    cublasCheck(cublasLtMatrixLayoutCreate(&ld, CUBLAS_X, m, n, m));
    cublasLtMatmulPreference_t pref;
    size_t ws = LT_WORKSPACE;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(g_cublaslt, desc, la, lb, ld, ld, pref, 1, &heur, &found));
    if (found == 0) die("cuBLASLt has no algorithm for a %d x %d x %d matmul with epilogue %d", m, n, k, (int)epilogue);
    const float zero = 0.0f;
    cublasCheck(cublasLtMatmul(g_cublaslt, desc, &alpha, a, la, b, lb, &zero, d, ld, d, ld, &heur.algo, g_lt_workspace, ws, 0));
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
}

// out (BT, OC) = inp (BT, C) @ W (OC, C)^T + bias, the bias added in the GEMM's epilogue; with
// pre_gelu != NULL, out = GELU(that) and pre_gelu keeps the GELU input for the backward
static void matmul_forward(floatX *out, const floatX *inp, const floatX *w, const floatX *bias, int BT, int C, int OC,
                           floatX *pre_gelu = NULL) {
    ProfScope prof(PROF_MATMUL);
    cublasLtEpilogue_t epi = pre_gelu ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    matmul_lt(out, w, inp, bias, pre_gelu, OC, BT, C, true, false, epi);
}

// dinp = dout @ W (overwritten; with pre_gelu, times GELU'(pre_gelu): the GELU backward fused);
// dW += dout^T @ inp (fp32); dbias += column sums of dout
// dw += inp^T dout (dw_beta 1), or dw = inp^T dout (dw_beta 0)
// alpha scales dout (the classifier's unscaled dlogits)
// The weight and bias gradients go to a side stream once dinp is computed: nothing on the main
// stream waits for them until a later sublayer's backward rewrites the gradient buffers they read
// (side_mark/side_wait in gpt_backward), so the compute-bound GEMMs run beside the memory-bound
// LayerNorm, attention and HC kernels. Same operations, same order per gradient: same results.
static cudaStream_t g_side;
static cublasHandle_t g_cublas_side;
static cudaEvent_t g_side_ready, g_side_ev[2];
static int g_side_on = -1;
static cudaStream_t g_coef;   // see coef_begin
static cudaEvent_t g_coef_go, g_coef_done;
static int side_on(void) {
    if (g_side_on < 0) {   // GPT_HC_SIDE_STREAM=0 turns it off; the profile's time split needs one stream
        const char *e = getenv("GPT_HC_SIDE_STREAM");
        g_side_on = !(e && atoi(e) == 0) && !prof_on();
        if (g_side_on) {
            cudaCheck(cudaStreamCreateWithFlags(&g_side, cudaStreamNonBlocking));
            cudaCheck(cudaEventCreateWithFlags(&g_side_ready, cudaEventDisableTiming));
            for (int i = 0; i < 2; i++) cudaCheck(cudaEventCreateWithFlags(&g_side_ev[i], cudaEventDisableTiming));
            cudaCheck(cudaStreamCreateWithFlags(&g_coef, cudaStreamNonBlocking));
            cudaCheck(cudaEventCreateWithFlags(&g_coef_go, cudaEventDisableTiming));
            cudaCheck(cudaEventCreateWithFlags(&g_coef_done, cudaEventDisableTiming));
            cublasCheck(cublasCreate(&g_cublas_side));
            cublasCheck(cublasSetStream(g_cublas_side, g_side));
#if defined(ENABLE_FP32)
            cublasCheck(cublasSetMathMode(g_cublas_side, CUBLAS_PEDANTIC_MATH));   // as g_cublas: no TF32
#endif
        }
    }
    return g_side_on;
}
// side_mark(s): event s marks the side-stream work handed over so far; side_wait(s): the main
// stream waits for it
static void side_mark(int s) {
    if (g_side_on > 0) cudaCheck(cudaEventRecord(g_side_ev[s], g_side));
}
static void side_wait(int s) {
    if (g_side_on > 0) cudaCheck(cudaStreamWaitEvent(0, g_side_ev[s], 0));
}
// A third stream (on with the side stream) for the HC coefficient work that sits on no dependency
// chain of the main stream: mHC's Sinkhorn-Knopp iterations (forward: res is first read by the
// post-mix, after the sublayer's GEMMs; backward: they need only dres, known before the sublayer's
// backward) and the reduces of the backward boundary kernel's parts. coef_begin: what is launched
// on the returned stream (0 when off) waits for everything the main stream has issued so far;
// coef_end marks it; coef_join: the main stream waits for all of it. Same kernels, same inputs:
// same results with or without.
static cudaStream_t coef_begin(void) {
    if (!side_on()) return 0;
    cudaCheck(cudaEventRecord(g_coef_go, 0));
    cudaCheck(cudaStreamWaitEvent(g_coef, g_coef_go, 0));
    return g_coef;
}
static void coef_end(void) {
    if (g_side_on > 0) cudaCheck(cudaEventRecord(g_coef_done, g_coef));
}
static void coef_join(void) {
    if (g_side_on > 0) cudaCheck(cudaStreamWaitEvent(0, g_coef_done, 0));
}

static void matmul_backward(floatX *dinp, float *dw, float *dbias, const floatX *dout, const floatX *inp, const floatX *w,
                            int BT, int C, int OC, floatX *pre_gelu = NULL, float dw_beta = 1.0f, float alpha = 1.0f) {
    ProfScope prof(PROF_MATMUL);
    matmul_lt(dinp, w, dout, NULL, pre_gelu, C, BT, OC, false, false, pre_gelu ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DEFAULT, alpha);
    int side = side_on();
    if (side) {
        cudaCheck(cudaEventRecord(g_side_ready, 0));
        cudaCheck(cudaStreamWaitEvent(g_side, g_side_ready, 0));
    }
    cublasCheck(cublasGemmEx(side ? g_cublas_side : g_cublas, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, BT, &alpha, inp, CUBLAS_X, C, dout, CUBLAS_X, OC,
                             &dw_beta, dw, CUDA_R_32F, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (dbias != NULL) colsum(dbias, dout, BT, OC, side ? g_side : 0, side ? 4 : 3);
}

// attention: q k^T batched, masked softmax, att v batched; att kept for the backward
static void attention_forward_cublas(floatX *out, floatX *att, const floatX *qkv, int B, int T, int C, int NH) {
    ProfScope prof(PROF_ATTENTION);
    int hs = C / NH;
    size_t nqkv = (size_t)B * NH * T * hs, natt = (size_t)B * NH * T * T;
    floatX *q = (floatX *)dscratch(0, 4 * nqkv * sizeof(floatX)), *k = q + nqkv, *v = k + nqkv, *y = v + nqkv;
    floatX *preatt = (floatX *)dscratch(1, natt * sizeof(floatX));
    permute_kernel<<<B * T, 256>>>(q, k, v, qkv, B, T, NH, hs);
    kernelCheck();
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, &one, k, CUBLAS_X, hs, (long long)T * hs,
                                           q, CUBLAS_X, hs, (long long)T * hs, &zero, preatt, CUBLAS_X, T, (long long)T * T,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (T % X128 == 0) softmax_forward_vec_kernel<<<B * NH * T, 128>>>(att, preatt, T, 1.0f / sqrtf((float)hs));
    else softmax_forward_kernel<<<B * NH * T, 128>>>(att, preatt, T, 1.0f / sqrtf((float)hs));   // e.g. sampling
    kernelCheck();
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, &one, v, CUBLAS_X, hs, (long long)T * hs,
                                           att, CUBLAS_X, T, (long long)T * T, &zero, y, CUBLAS_X, hs, (long long)T * hs,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    unpermute_kernel<<<B * T, 256>>>(out, y, B, T, NH, hs, 0);
    kernelCheck();
}

static void attention_backward_cublas(floatX *dqkv, const floatX *dout, const floatX *qkv, const floatX *att, int B, int T, int C, int NH) {
    ProfScope prof(PROF_ATTENTION);
    int hs = C / NH;
    size_t nqkv = (size_t)B * NH * T * hs, natt = (size_t)B * NH * T * T;
    floatX *q = (floatX *)dscratch(0, 4 * nqkv * sizeof(floatX)), *k = q + nqkv, *v = k + nqkv, *dy = v + nqkv;
    floatX *buf = (floatX *)dscratch(1, 2 * natt * sizeof(floatX)), *datt = buf, *dpre = buf + natt;
    floatX *dq = (floatX *)dscratch(2, 3 * nqkv * sizeof(floatX)), *dk = dq + nqkv, *dv = dk + nqkv;
    permute_kernel<<<B * T, 256>>>(q, k, v, qkv, B, T, NH, hs);
    unpermute_kernel<<<B * T, 256>>>(dy, dout, B, T, NH, hs, 1);
    kernelCheck();
    const float one = 1.0f, zero = 0.0f;
    // datt = dy v^T ; dv = att^T dy
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, &one, v, CUBLAS_X, hs, (long long)T * hs,
                                           dy, CUBLAS_X, hs, (long long)T * hs, &zero, datt, CUBLAS_X, T, (long long)T * T,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, &one, dy, CUBLAS_X, hs, (long long)T * hs,
                                           att, CUBLAS_X, T, (long long)T * T, &zero, dv, CUBLAS_X, hs, (long long)T * hs,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (T % X128 == 0) softmax_backward_vec_kernel<<<B * NH * T, 128>>>(dpre, datt, att, T, 1.0f / sqrtf((float)hs));
    else softmax_backward_kernel<<<B * NH * T, 128>>>(dpre, datt, att, T, 1.0f / sqrtf((float)hs));
    kernelCheck();
    // dq = dpre k ; dk = dpre^T q
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, &one, k, CUBLAS_X, hs, (long long)T * hs,
                                           dpre, CUBLAS_X, T, (long long)T * T, &zero, dq, CUBLAS_X, hs, (long long)T * hs,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    cublasCheck(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, &one, q, CUBLAS_X, hs, (long long)T * hs,
                                           dpre, CUBLAS_X, T, (long long)T * T, &zero, dk, CUBLAS_X, hs, (long long)T * hs,
                                           B * NH, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    permute_backward_kernel<<<B * T, 256>>>(dqkv, dq, dk, dv, B, T, NH, hs);
    kernelCheck();
}


#if !defined(ENABLE_FP32)
// ----------------------------------------------------------------------------
// fused causal attention (the FlashAttention-2 algorithm) on bf16 tensor cores, head size 64.
// mma.sync m16n8k16 with fp32 accumulators kept in registers: each warp owns 16 rows (a block of
// W warps owns 16 W), so row statistics stay in registers and the score fragments turn into the
// next product's A operand without touching shared memory; the other operand streams through
// shared memory in 64-row tiles. Reads q, k, v straight from the (B, T, 3C) qkv tensor and writes
// (B, T, C); stores only the row logsumexp for the backward. The backward recomputes P; dK/dV (one
// block per key block) and dQ (one block per query block) are separate kernels so every gradient
// element has one writer: deterministic, no atomics.

#define FA_HS 64   // head size
#define FA_BR 64   // rows of a tile (queries or keys)
#define FA_LD 72   // bf16 row stride in shared memory: 144 bytes, so ldmatrix rows hit distinct banks
#define FA_TILE_BYTES (FA_BR * FA_LD * 2)

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// 4 bytes (valid: else zero-filled), for per-token scalars without 16-byte alignment
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
// the first `bytes` (0..16) of 16, the rest zero-filled
__device__ __forceinline__ void cp_async16_n(void *dst, const void *src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma_bf16(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);   // lo in the low half: the lower column
    return *reinterpret_cast<uint32_t *>(&v);
}

// ROWS rows x 64 bf16 starting at src (row stride ld elements) into a shared tile, asynchronously;
// rows at or past `rows` are zero-filled
template <int ROWS = FA_BR>
__device__ __forceinline__ void fa_load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int rows, size_t ld) {
    for (int i = threadIdx.x; i < ROWS * 8; i += blockDim.x) {
        int r = i >> 3, c = (i & 7) * 8;
        bool ok = r < rows;
        cp_async16(dst + r * FA_LD + c, ok ? src + (size_t)r * ld + c : src, ok);
    }
}

// A operand (16 rows x 64, row-major) of the calling warp from a shared tile: a[kk] covers k in [16kk, 16kk+16)
__device__ __forceinline__ void fa_load_a(uint32_t a[4][4], const __nv_bfloat16 *rows16) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) ldsm_x4(a[kk], rows16 + (lane % 16) * FA_LD + kk * 16 + (lane / 16) * 8);
}

// acc (16 x 64) += A[:, 16kk:16kk+16] * Bt[:, 16kk:16kk+16]^T (one k step; A's fragment in a)
__device__ __forceinline__ void fa_mma_nt_step(float acc[8][4], const uint32_t a[4], const __nv_bfloat16 *Bt, int kk) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int jp = 0; jp < 4; jp++) {
        uint32_t b[4];
        ldsm_x4(b, Bt + ((lane % 8) + (lane / 16) * 8 + jp * 16) * FA_LD + kk * 16 + ((lane / 8) % 2) * 8);
        mma_bf16(acc[2 * jp], a, b[0], b[1]);
        mma_bf16(acc[2 * jp + 1], a, b[2], b[3]);
    }
}

// acc (16 x 64) += A (16 x 64) * Bt^T, with Bt a shared 64 x 64 tile stored [n][k] (k contiguous)
__device__ __forceinline__ void fa_mma_nt(float acc[8][4], const uint32_t a[4][4], const __nv_bfloat16 *Bt) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) fa_mma_nt_step(acc, a[kk], Bt, kk);
}

// as fa_mma_nt, with A read from a shared tile (16 rows, k contiguous) one k step at a time
__device__ __forceinline__ void fa_mma_nt_sa(float acc[8][4], const __nv_bfloat16 *A16, const __nv_bfloat16 *Bt) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint32_t a[4];
        ldsm_x4(a, A16 + (lane % 16) * FA_LD + kk * 16 + (lane / 16) * 8);
        fa_mma_nt_step(acc, a, Bt, kk);
    }
}

// acc (16 x 64) += A (16 x 64) * B, with B a shared 64 x 64 tile stored [k][n] (n contiguous)
__device__ __forceinline__ void fa_mma_nn(float acc[8][4], const uint32_t a[4][4], const __nv_bfloat16 *B) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            uint32_t b[4];
            ldsm_x4_t(b, B + ((lane % 8) + ((lane / 8) % 2) * 8 + kk * 16) * FA_LD + jp * 16 + (lane / 16) * 8);
            mma_bf16(acc[2 * jp], a[kk], b[0], b[1]);
            mma_bf16(acc[2 * jp + 1], a[kk], b[2], b[3]);
        }
}

// a 16 x 64 accumulator (C layout) as the bf16 A operand of the next product
__device__ __forceinline__ void fa_acc_to_a(uint32_t a[4][4], const float s[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

// 16 x 64 accumulator rows (row0 + lane/4, + 8) scaled and stored as bf16 into a row-major tensor
__device__ __forceinline__ void fa_store_rows(__nv_bfloat16 *dst, size_t ld, const float acc[8][4], int row0, int T, float scale) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = row0 + lane / 4 + 8 * h;
        if (r >= T) continue;
#pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<uint32_t *>(dst + (size_t)r * ld + j * 8 + 2 * (lane % 4)) =
                pack_bf16(acc[j][2 * h] * scale, acc[j][2 * h + 1] * scale);
    }
}

// grid (query blocks of 16 W rows, B * NH), 32 W threads; each warp owns 16 query rows and walks the
// 64-key tiles up to its last row; lse in log2 units of the scaled scores
template <int W>
__global__ void __launch_bounds__(32 * W) flash_forward_kernel(__nv_bfloat16 *out, float *lse, const __nv_bfloat16 *qkv, int T, int NH,
                                                               float scale_log2) {
    constexpr int QB = 16 * W;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)fa_smem, *Ks = Qs + QB * FA_LD, *Vs = Ks + 2 * FA_BR * FA_LD;
    int q0 = (gridDim.x - 1 - blockIdx.x) * QB;   // the longest rows first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * FA_HS, C3 = 3 * C;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int wrow0 = q0 + warp * 16, last = (min(T, q0 + QB) - 1) / FA_BR;   // the block's last key tile
    const __nv_bfloat16 *base = qkv + (size_t)b * T * C3 + h * FA_HS;
    fa_load_tile<QB>(Qs, base + (size_t)q0 * C3, T - q0, C3);
    fa_load_tile(Ks, base + C, T, C3);
    fa_load_tile(Vs, base + 2 * C, T, C3);
    cp_async_commit();
    float o[8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    uint32_t qa[4][4];
    int row0 = wrow0 + lane / 4;   // this thread's rows: row0, row0 + 8
    for (int kt = 0; kt <= last; kt++) {
        int buf = kt % 2;
        if (kt < last) {
            int nb = (kt + 1) % 2;
            fa_load_tile(Ks + nb * FA_BR * FA_LD, base + (size_t)(kt + 1) * FA_BR * C3 + C, T - (kt + 1) * FA_BR, C3);
            fa_load_tile(Vs + nb * FA_BR * FA_LD, base + (size_t)(kt + 1) * FA_BR * C3 + 2 * C, T - (kt + 1) * FA_BR, C3);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (kt == 0) fa_load_a(qa, Qs + warp * 16 * FA_LD);
        if (W <= 4 || kt * FA_BR <= wrow0 + 15) {   // tiles wholly past the warp's rows are skipped (W > 4 only)
            float s[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            fa_mma_nt(s, qa, Ks + buf * FA_BR * FA_LD);
            bool diag = kt * FA_BR + FA_BR - 1 > wrow0;   // some key of the tile lies past some row
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = kt * FA_BR + j * 8 + 2 * (lane % 4) + (e & 1), row = row0 + (e >> 1) * 8;
                    s[j][e] = (!diag || col <= row) ? s[j][e] * scale_log2 : -INFINITY;
                }
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < 8; j++) mx = fmaxf(mx, fmaxf(s[j][2 * h2], s[j][2 * h2 + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                float mnew = fmaxf(m[h2], mx);   // finite: every row sees key 0 in tile 0
                float corr = exp2f(m[h2] - mnew), sum = 0.0f;
                m[h2] = mnew;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    s[j][2 * h2] = exp2f(s[j][2 * h2] - mnew);
                    s[j][2 * h2 + 1] = exp2f(s[j][2 * h2 + 1] - mnew);
                    sum += s[j][2 * h2] + s[j][2 * h2 + 1];
                    o[j][2 * h2] *= corr;
                    o[j][2 * h2 + 1] *= corr;
                }
                l[h2] = l[h2] * corr + sum;
            }
            uint32_t pa[4][4];
            fa_acc_to_a(pa, s);
            fa_mma_nn(o, pa, Vs + buf * FA_BR * FA_LD);
        }
        __syncthreads();   // buffer `buf` is refilled next iteration
    }
    __nv_bfloat16 *ob = out + (size_t)b * T * C + h * FA_HS;
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l[h2] += __shfl_xor_sync(0xffffffff, l[h2], 1);
        l[h2] += __shfl_xor_sync(0xffffffff, l[h2], 2);
        float inv = 1.0f / l[h2];
#pragma unroll
        for (int j = 0; j < 8; j++) { o[j][2 * h2] *= inv; o[j][2 * h2 + 1] *= inv; }
        int r = row0 + 8 * h2;
        if (lane % 4 == 0 && r < T) lse[(size_t)bh * T + r] = m[h2] + log2f(l[h2]);
    }
    fa_store_rows(ob, C, o, wrow0, T, 1.0f);
}

// D[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d]: 8 threads per (token, head), 16 bytes each
__global__ void flash_rowdot_kernel(float *D, const __nv_bfloat16 *dout, const __nv_bfloat16 *out, int BT, int T, int NH) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t row = idx / 8;   // (token, head)
    int part = (int)(idx % 8);
    float s = 0.0f;
    if (row < (size_t)BT * NH) {
        const __nv_bfloat16 *a = dout + row * FA_HS + part * 8, *o = out + row * FA_HS + part * 8;
        x128 av = load128(a), ov = load128(o);
#pragma unroll
        for (int e = 0; e < 8; e++) s += tof(av.v[e]) * tof(ov.v[e]);
    }
    s += __shfl_xor_sync(0xffffffff, s, 1);
    s += __shfl_xor_sync(0xffffffff, s, 2);
    s += __shfl_xor_sync(0xffffffff, s, 4);
    if (part == 0 && row < (size_t)BT * NH) {
        int bt = (int)(row / NH), h = (int)(row % NH), b = bt / T, t = bt % T;
        D[((size_t)b * NH + h) * T + t] = s;
    }
}

// dK, dV for one block of 16 W keys: loop over the 64-query tiles that reach it. Each warp owns 16
// keys and works with the transposed scores S^T = K Q^T, so P^T and dS^T are already A operands.
template <int W>
__global__ void __launch_bounds__(32 * W) flash_backward_kv_kernel(__nv_bfloat16 *dqkv, const __nv_bfloat16 *qkv, const __nv_bfloat16 *dout,
                                                                   const float *lse, const float *D, int T, int NH, float scale_log2,
                                                                   float scale) {
    constexpr int KB = 16 * W;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Ks = (__nv_bfloat16 *)fa_smem, *Vs = Ks + KB * FA_LD, *Qs = Vs + KB * FA_LD, *dOs = Qs + 2 * FA_BR * FA_LD;
    float *lse_s = (float *)(dOs + 2 * FA_BR * FA_LD), *D_s = lse_s + 2 * FA_BR;
    int k0 = blockIdx.x * KB;   // the blocks with the most queries first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * FA_HS, C3 = 3 * C, nq = (T + FA_BR - 1) / FA_BR;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wkey0 = k0 + warp * 16;
    const __nv_bfloat16 *base = qkv + (size_t)b * T * C3 + h * FA_HS, *dbase = dout + (size_t)b * T * C + h * FA_HS;
    const float *lse_b = lse + (size_t)bh * T, *D_b = D + (size_t)bh * T;
    int qt0 = k0 / FA_BR;   // the first query tile with a query at or past key k0
    fa_load_tile<KB>(Ks, base + (size_t)k0 * C3 + C, T - k0, C3);
    fa_load_tile<KB>(Vs, base + (size_t)k0 * C3 + 2 * C, T - k0, C3);
    fa_load_tile(Qs, base + (size_t)qt0 * FA_BR * C3, T - qt0 * FA_BR, C3);
    fa_load_tile(dOs, dbase + (size_t)qt0 * FA_BR * C, T - qt0 * FA_BR, C);
    cp_async_commit();
    if (threadIdx.x < FA_BR) {   // rows past T: P = 0
        int t = qt0 * FA_BR + threadIdx.x;
        lse_s[threadIdx.x] = t < T ? lse_b[t] : INFINITY;
        D_s[threadIdx.x] = t < T ? D_b[t] : 0.0f;
    }
    float dk[8][4], dv[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[j][e] = dv[j][e] = 0.0f;
    int key0 = wkey0 + lane / 4;   // this thread's keys: key0, key0 + 8
    for (int qt = qt0; qt < nq; qt++) {
        int buf = (qt - qt0) % 2;
        if (qt + 1 < nq) {
            int nb = 1 - buf, q1 = (qt + 1) * FA_BR;
            fa_load_tile(Qs + nb * FA_BR * FA_LD, base + (size_t)q1 * C3, T - q1, C3);
            fa_load_tile(dOs + nb * FA_BR * FA_LD, dbase + (size_t)q1 * C, T - q1, C);
            cp_async_commit();
            if (threadIdx.x < FA_BR) {
                int t = q1 + threadIdx.x;
                lse_s[nb * FA_BR + threadIdx.x] = t < T ? lse_b[t] : INFINITY;
                D_s[nb * FA_BR + threadIdx.x] = t < T ? D_b[t] : 0.0f;
            }
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (W <= 4 || qt * FA_BR + FA_BR - 1 >= wkey0) {   // tiles wholly before the warp's keys are skipped (W > 4 only)
            const __nv_bfloat16 *Qb = Qs + buf * FA_BR * FA_LD, *dOb = dOs + buf * FA_BR * FA_LD;
            const float *lsb = lse_s + buf * FA_BR, *Db = D_s + buf * FA_BR;
            float s[8][4], dp[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
            fa_mma_nt_sa(s, Ks + warp * 16 * FA_LD, Qb);    // S^T: keys x queries
            fa_mma_nt_sa(dp, Vs + warp * 16 * FA_LD, dOb);  // dP^T = V dO^T
            bool diag = qt * FA_BR < wkey0 + 15;   // some query of the tile lies before some key
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qc = j * 8 + 2 * (lane % 4) + (e & 1), key = key0 + (e >> 1) * 8;
                    float p = (!diag || key <= qt * FA_BR + qc) ? exp2f(s[j][e] * scale_log2 - lsb[qc]) : 0.0f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - Db[qc]);   // dS^T (gradient of the scaled score)
                }
            uint32_t pa[4][4];
            fa_acc_to_a(pa, s);
            fa_mma_nn(dv, pa, dOb);   // dV += P^T dO
            fa_acc_to_a(pa, dp);
            fa_mma_nn(dk, pa, Qb);    // dK += dS^T Q
        }
        __syncthreads();
    }
    __nv_bfloat16 *gb = dqkv + (size_t)b * T * C3 + h * FA_HS;
    fa_store_rows(gb + C, C3, dk, wkey0, T, scale);
    fa_store_rows(gb + 2 * C, C3, dv, wkey0, T, 1.0f);
}

// dQ for one block of 16 W queries: loop over the 64-key tiles up to its last query
template <int W>
__global__ void __launch_bounds__(32 * W) flash_backward_q_kernel(__nv_bfloat16 *dqkv, const __nv_bfloat16 *qkv, const __nv_bfloat16 *dout,
                                                                  const float *lse, const float *D, int T, int NH, float scale_log2,
                                                                  float scale) {
    constexpr int QB = 16 * W;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)fa_smem, *dOs = Qs + QB * FA_LD, *Ks = dOs + QB * FA_LD, *Vs = Ks + 2 * FA_BR * FA_LD;
    int q0 = (gridDim.x - 1 - blockIdx.x) * QB;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * FA_HS, C3 = 3 * C;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wrow0 = q0 + warp * 16, last = (min(T, q0 + QB) - 1) / FA_BR;
    const __nv_bfloat16 *base = qkv + (size_t)b * T * C3 + h * FA_HS, *dbase = dout + (size_t)b * T * C + h * FA_HS;
    fa_load_tile<QB>(Qs, base + (size_t)q0 * C3, T - q0, C3);
    fa_load_tile<QB>(dOs, dbase + (size_t)q0 * C, T - q0, C);
    fa_load_tile(Ks, base + C, T, C3);
    fa_load_tile(Vs, base + 2 * C, T, C3);
    cp_async_commit();
    int row0 = wrow0 + lane / 4;
    float lr[2], dr[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        int r = row0 + 8 * h2;
        lr[h2] = r < T ? lse[(size_t)bh * T + r] : INFINITY;
        dr[h2] = r < T ? D[(size_t)bh * T + r] : 0.0f;
    }
    float dq[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
    uint32_t qa[4][4], da[4][4];
    for (int kt = 0; kt <= last; kt++) {
        int buf = kt % 2;
        if (kt < last) {
            int nb = 1 - buf, k1 = (kt + 1) * FA_BR;
            fa_load_tile(Ks + nb * FA_BR * FA_LD, base + (size_t)k1 * C3 + C, T - k1, C3);
            fa_load_tile(Vs + nb * FA_BR * FA_LD, base + (size_t)k1 * C3 + 2 * C, T - k1, C3);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (kt == 0) {
            fa_load_a(qa, Qs + warp * 16 * FA_LD);
            fa_load_a(da, dOs + warp * 16 * FA_LD);
        }
        if (W <= 4 || kt * FA_BR <= wrow0 + 15) {
            const __nv_bfloat16 *Kb = Ks + buf * FA_BR * FA_LD, *Vb = Vs + buf * FA_BR * FA_LD;
            float s[8][4], dp[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
            fa_mma_nt(s, qa, Kb);    // S = Q K^T
            fa_mma_nt(dp, da, Vb);   // dP = dO V^T
            bool diag = kt * FA_BR + FA_BR - 1 > wrow0;
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = kt * FA_BR + j * 8 + 2 * (lane % 4) + (e & 1), row = row0 + (e >> 1) * 8;
                    float p = (!diag || col <= row) ? exp2f(s[j][e] * scale_log2 - lr[e >> 1]) : 0.0f;
                    dp[j][e] = p * (dp[j][e] - dr[e >> 1]);
                }
            uint32_t pa[4][4];
            fa_acc_to_a(pa, dp);
            fa_mma_nn(dq, pa, Kb);   // dQ += dS K
        }
        __syncthreads();
    }
    fa_store_rows(dqkv + (size_t)b * T * C3 + h * FA_HS, C3, dq, wrow0, T, scale);
}

// warps per block of the three kernels (16 rows each); dev/cuda/bench_attention times 4 and 8
#ifndef FA_WARPS
#define FA_WARPS 4
#endif
#define FA_FWD_SMEM(W) ((16 * (W) + 4 * FA_BR) * FA_LD * 2)
#define FA_BWD_SMEM(W) ((2 * 16 * (W) + 4 * FA_BR) * FA_LD * 2 + 4 * FA_BR * 4)
#define FA_BWDQ_SMEM(W) ((2 * 16 * (W) + 4 * FA_BR) * FA_LD * 2)
template <int W>
static void flash_init_w(void) {
    cudaCheck(cudaFuncSetAttribute(flash_forward_kernel<W>, cudaFuncAttributeMaxDynamicSharedMemorySize, FA_FWD_SMEM(W)));
    cudaCheck(cudaFuncSetAttribute(flash_backward_kv_kernel<W>, cudaFuncAttributeMaxDynamicSharedMemorySize, FA_BWD_SMEM(W)));
    cudaCheck(cudaFuncSetAttribute(flash_backward_q_kernel<W>, cudaFuncAttributeMaxDynamicSharedMemorySize, FA_BWDQ_SMEM(W)));
}
static void flash_init(void) {
    flash_init_w<4>();
    flash_init_w<8>();
}

template <int W = FA_WARPS>
static void attention_forward_flash(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH) {
    ProfScope prof(PROF_ATTENTION);
    dim3 grid(ceil_div(T, 16 * W), B * NH);
    flash_forward_kernel<W><<<grid, 32 * W, FA_FWD_SMEM(W)>>>(out, lse, qkv, T, NH, 0.125f * (float)M_LOG2E);
    kernelCheck();
}

template <int W = FA_WARPS>
static void attention_backward_flash(floatX *dqkv, const floatX *dout, const floatX *out, const float *lse, const floatX *qkv, int B, int T, int NH) {
    ProfScope prof(PROF_ATTENTION);
    float *D = (float *)dscratch(1, (size_t)B * NH * T * sizeof(float));
    flash_rowdot_kernel<<<ceil_div((size_t)B * T * NH * 8, 256), 256>>>(D, dout, out, B * T, T, NH);
    kernelCheck();
    dim3 grid(ceil_div(T, 16 * W), B * NH);
    flash_backward_kv_kernel<W><<<grid, 32 * W, FA_BWD_SMEM(W)>>>(dqkv, qkv, dout, lse, D, T, NH, 0.125f * (float)M_LOG2E, 0.125f);
    kernelCheck();
    flash_backward_q_kernel<W><<<grid, 32 * W, FA_BWDQ_SMEM(W)>>>(dqkv, qkv, dout, lse, D, T, NH, 0.125f * (float)M_LOG2E, 0.125f);
    kernelCheck();
}
#endif

// ----------------------------------------------------------------------------
// attention through cuDNN's fused SDPA (BF16, head size 64). No C++ frontend is installed here, so
// the graph is built with the backend API (cudnn_graph.h): the same operations the frontend's sdpa
// and sdpa_backward nodes lower to (bmm, scale, causal select, softmax with stats, bmm), which
// cuDNN's heuristics match to its fused flash-attention engines. The backward writes dQ directly
// (no fp32 dQ accumulator), cuDNN's deterministic variant. dev/cuda/bench_attention.cu compares it
// with the mma.sync kernels above.
#if !defined(ENABLE_FP32)
static void cudnn_check(cudnnStatus_t s, const char *file, int line) {
    if (s != CUDNN_STATUS_SUCCESS) die("cuDNN: %s [%s:%d]", cudnnGetErrorString(s), file, line);
}
#define cudnnCheck(x) cudnn_check((x), __FILE__, __LINE__)

static cudnnHandle_t g_cudnn;
static void *g_cudnn_ws;
static size_t g_cudnn_ws_size;

// one graph under construction: every descriptor is kept (the plan refers to the graph) and the
// first failing call is remembered, so an unsupported graph falls back instead of dying
typedef struct {
    cudnnBackendDescriptor_t d[128], ops[32];
    int nd, nops, err_line;
    cudnnStatus_t err;
    int64_t next_uid;
} CdGraph;
static void cd_ok(CdGraph *g, cudnnStatus_t s, int line) {
    if (s != CUDNN_STATUS_SUCCESS && g->err_line == 0) { g->err = s; g->err_line = line; }
}
#define CD_SET(g, desc, attr, type, n, ptr) cd_ok(g, cudnnBackendSetAttribute(desc, attr, type, n, ptr), __LINE__)
#define CD_FIN(g, desc) cd_ok(g, cudnnBackendFinalize(desc), __LINE__)
static cudnnBackendDescriptor_t cd_new(CdGraph *g, cudnnBackendDescriptorType_t type) {
    cudnnBackendDescriptor_t d = NULL;
    if (g->nd == 128) { cd_ok(g, CUDNN_STATUS_INTERNAL_ERROR, __LINE__); return NULL; }
    cd_ok(g, cudnnBackendCreateDescriptor(type, &d), __LINE__);
    g->d[g->nd++] = d;
    return d;
}
enum { CD_REAL, CD_VIRTUAL, CD_BY_VALUE };
static cudnnBackendDescriptor_t cd_tensor(CdGraph *g, int64_t uid, cudnnDataType_t type, const int64_t dim[4], const int64_t stride[4], int kind) {
    cudnnBackendDescriptor_t t = cd_new(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    int64_t align = 16;
    bool virt = kind == CD_VIRTUAL, by_value = kind == CD_BY_VALUE;
    if (virt) uid = g->next_uid++;
    CD_SET(g, t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
    CD_SET(g, t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dim);
    CD_SET(g, t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, stride);
    CD_SET(g, t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    CD_SET(g, t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    CD_SET(g, t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &virt);
    if (by_value) CD_SET(g, t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    CD_FIN(g, t);
    return t;
}
// an operation node: each (attribute, descriptor) pair set (NULL ones skipped), finalized, appended
static void cd_op(CdGraph *g, cudnnBackendDescriptorType_t type, int n, const cudnnBackendAttributeName_t *attrs,
                  const cudnnBackendDescriptor_t *descs) {
    cudnnBackendDescriptor_t op = cd_new(g, type);
    for (int i = 0; i < n; i++)
        if (descs[i]) CD_SET(g, op, attrs[i], CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &descs[i]);
    CD_FIN(g, op);
    if (g->nops == 32) cd_ok(g, CUDNN_STATUS_INTERNAL_ERROR, __LINE__);
    else g->ops[g->nops++] = op;
}
// y = mode(x, b, t); b and t may be NULL; axis >= 0 for GEN_INDEX
static void cd_pointwise(CdGraph *g, cudnnPointwiseMode_t mode, cudnnDataType_t prec, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b,
                         cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y, int64_t axis = -1) {
    cudnnBackendDescriptor_t pw = cd_new(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    CD_SET(g, pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    CD_SET(g, pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) CD_SET(g, pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    CD_FIN(g, pw);
    const cudnnBackendAttributeName_t at[5] = {CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_ATTR_OPERATION_POINTWISE_XDESC,
                                               CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_ATTR_OPERATION_POINTWISE_TDESC,
                                               CUDNN_ATTR_OPERATION_POINTWISE_YDESC};
    const cudnnBackendDescriptor_t d[5] = {pw, x, b, t, y};
    cd_op(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, 5, at, d);
}
static void cd_matmul(CdGraph *g, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t mm = cd_new(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    CD_SET(g, mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    CD_FIN(g, mm);
    const cudnnBackendAttributeName_t at[4] = {CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_ATTR_OPERATION_MATMUL_BDESC,
                                               CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_ATTR_OPERATION_MATMUL_DESC};
    const cudnnBackendDescriptor_t d[4] = {a, b, c, mm};
    cd_op(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, 4, at, d);
}
static void cd_reduce(CdGraph *g, cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t r = cd_new(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    CD_SET(g, r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    CD_SET(g, r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    CD_FIN(g, r);
    const cudnnBackendAttributeName_t at[3] = {CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_ATTR_OPERATION_REDUCTION_YDESC,
                                               CUDNN_ATTR_OPERATION_REDUCTION_DESC};
    const cudnnBackendDescriptor_t d[3] = {x, y, r};
    cd_op(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, 3, at, d);
}
static void cd_reshape(CdGraph *g, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    const cudnnBackendAttributeName_t at[2] = {CUDNN_ATTR_OPERATION_RESHAPE_XDESC, CUDNN_ATTR_OPERATION_RESHAPE_YDESC};
    const cudnnBackendDescriptor_t d[2] = {x, y};
    cd_op(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, 2, at, d);
}

// tensor ids of the variant pack; the by-value scalars live in host memory for the whole run
enum { SD_Q = 1, SD_K, SD_V, SD_O, SD_STATS, SD_SCALE, SD_LOWEST, SD_ONE, SD_DO, SD_DQ, SD_DK, SD_DV };
static const float sd_scale = 0.125f, sd_lowest = -FLT_MAX, sd_one = 1.0f;   // 1/sqrt(64)

// the causal score chain shared by both graphs: s = (Q K^T) * scale, masked to -FLT_MAX above the diagonal
static cudnnBackendDescriptor_t cd_scores(CdGraph *g, cudnnBackendDescriptor_t q, cudnnBackendDescriptor_t kt, const int64_t *ss, const int64_t *ssd,
                                          cudnnBackendDescriptor_t scale, cudnnBackendDescriptor_t lowest) {
    const cudnnDataType_t F = CUDNN_DATA_FLOAT, I = CUDNN_DATA_INT32, BOOL = CUDNN_DATA_BOOLEAN;
    cudnnBackendDescriptor_t s = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), s2 = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
    cd_matmul(g, q, kt, s);
    cd_pointwise(g, CUDNN_POINTWISE_MUL, F, s, scale, NULL, s2);
    cudnnBackendDescriptor_t row = cd_tensor(g, 0, I, ss, ssd, CD_VIRTUAL), col = cd_tensor(g, 0, I, ss, ssd, CD_VIRTUAL);
    cudnnBackendDescriptor_t keep = cd_tensor(g, 0, BOOL, ss, ssd, CD_VIRTUAL), s3 = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
    cd_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, I, s2, NULL, NULL, row, 2);
    cd_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, I, s2, NULL, NULL, col, 3);
    cd_pointwise(g, CUDNN_POINTWISE_CMP_GE, BOOL, row, col, NULL, keep);
    cd_pointwise(g, CUDNN_POINTWISE_BINARY_SELECT, F, s2, lowest, keep, s3);
    return s3;
}

// builds the forward (bwd = 0) or backward graph for B x T x NH heads of 64 over the qkv layout
// (B, T, 3, NH, 64) and finds an engine for it; returns NULL (and the reason in why) if none
static cudnnBackendDescriptor_t cudnn_sdpa_plan(int B, int T, int NH, int bwd, int64_t *ws, char *why, size_t why_len) {
    CdGraph *g = (CdGraph *)calloc(1, sizeof(CdGraph));
    g->next_uid = 100;
    const cudnnDataType_t F = CUDNN_DATA_FLOAT, BF = CUDNN_DATA_BFLOAT16;
    int64_t C = (int64_t)NH * 64, Tl = T, hs = 64;
    int64_t qd[4] = {B, NH, Tl, hs}, qs[4] = {3 * C * Tl, hs, 3 * C, 1};       // Q, K, V, dQ, dK, dV in (B, T, 3, NH, 64)
    int64_t ktd[4] = {B, NH, hs, Tl}, kts[4] = {3 * C * Tl, hs, 1, 3 * C};     // K^T (and V^T) as strides over the same memory
    int64_t od[4] = {B, NH, Tl, hs}, os[4] = {C * Tl, hs, C, 1};               // O, dO in (B, T, NH, 64)
    int64_t rd[4] = {B, NH, Tl, 1}, rs[4] = {NH * Tl, Tl, 1, 1};               // per-row statistics
    int64_t ss[4] = {B, NH, Tl, Tl}, ssd[4] = {NH * Tl * Tl, Tl * Tl, Tl, 1};  // scores (virtual)
    int64_t sst[4] = {NH * Tl * Tl, Tl * Tl, 1, Tl};                           // scores transposed
    int64_t one[4] = {1, 1, 1, 1};
    cudnnBackendDescriptor_t q = cd_tensor(g, SD_Q, BF, qd, qs, CD_REAL), kt = cd_tensor(g, SD_K, BF, ktd, kts, CD_REAL);
    cudnnBackendDescriptor_t stats = cd_tensor(g, SD_STATS, F, rd, rs, CD_REAL), o = cd_tensor(g, SD_O, BF, od, os, CD_REAL);
    cudnnBackendDescriptor_t scale = cd_tensor(g, SD_SCALE, F, one, one, CD_BY_VALUE), lowest = cd_tensor(g, SD_LOWEST, F, one, one, CD_BY_VALUE);
    cudnnBackendDescriptor_t s = cd_scores(g, q, kt, ss, ssd, scale, lowest);
    if (!bwd) {
        // softmax with stats = max + log(sum exp), then O = P V
        cudnnBackendDescriptor_t v = cd_tensor(g, SD_V, BF, qd, qs, CD_REAL);
        cudnnBackendDescriptor_t mx = cd_tensor(g, 0, F, rd, rs, CD_VIRTUAL), sm = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
        cudnnBackendDescriptor_t e = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), z = cd_tensor(g, 0, F, rd, rs, CD_VIRTUAL);
        cudnnBackendDescriptor_t lz = cd_tensor(g, 0, F, rd, rs, CD_VIRTUAL), p = cd_tensor(g, 0, BF, ss, ssd, CD_VIRTUAL);
        cd_reduce(g, CUDNN_REDUCE_TENSOR_MAX, s, mx);
        cd_pointwise(g, CUDNN_POINTWISE_SUB, F, s, mx, NULL, sm);
        cd_pointwise(g, CUDNN_POINTWISE_EXP, F, sm, NULL, NULL, e);
        cd_reduce(g, CUDNN_REDUCE_TENSOR_ADD, e, z);
        cd_pointwise(g, CUDNN_POINTWISE_LOG, F, z, NULL, NULL, lz);
        cd_pointwise(g, CUDNN_POINTWISE_ADD, F, mx, lz, NULL, stats);
        cd_pointwise(g, CUDNN_POINTWISE_DIV, F, e, z, NULL, p);
        cd_matmul(g, p, v, o);
    } else {
        cudnnBackendDescriptor_t vt = cd_tensor(g, SD_V, BF, ktd, kts, CD_REAL), dout = cd_tensor(g, SD_DO, BF, od, os, CD_REAL);
        cudnnBackendDescriptor_t dq = cd_tensor(g, SD_DQ, BF, qd, qs, CD_REAL), dk = cd_tensor(g, SD_DK, BF, qd, qs, CD_REAL);
        cudnnBackendDescriptor_t dv = cd_tensor(g, SD_DV, BF, qd, qs, CD_REAL), onev = cd_tensor(g, SD_ONE, F, one, one, CD_BY_VALUE);
        int64_t pd[4] = {B, NH, Tl, hs}, ps[4] = {NH * Tl * hs, Tl * hs, hs, 1};
        // D = rowsum(dO o O)
        cudnnBackendDescriptor_t doo = cd_tensor(g, 0, F, pd, ps, CD_VIRTUAL), d0 = cd_tensor(g, 0, F, rd, rs, CD_VIRTUAL);
        cudnnBackendDescriptor_t d = cd_tensor(g, 0, F, rd, rs, CD_VIRTUAL);
        cd_pointwise(g, CUDNN_POINTWISE_MUL, F, dout, o, NULL, doo);
        cd_reduce(g, CUDNN_REDUCE_TENSOR_ADD, doo, d0);
        cd_pointwise(g, CUDNN_POINTWISE_MUL, F, d0, onev, NULL, d);
        // P = exp(s - stats); dV = P^T dO
        cudnnBackendDescriptor_t sm = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), p = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
        cudnnBackendDescriptor_t pt = cd_tensor(g, 0, BF, ss, sst, CD_VIRTUAL);
        cd_pointwise(g, CUDNN_POINTWISE_SUB, F, s, stats, NULL, sm);
        cd_pointwise(g, CUDNN_POINTWISE_EXP, F, sm, NULL, NULL, p);
        cd_reshape(g, p, pt);
        cd_matmul(g, pt, dout, dv);
        // dS = P o (dO V^T - D) * scale; dK = dS^T Q, dQ = dS K
        cudnnBackendDescriptor_t dp = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), dp1 = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
        cudnnBackendDescriptor_t dp2 = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), ds0 = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL);
        cudnnBackendDescriptor_t ds = cd_tensor(g, 0, F, ss, ssd, CD_VIRTUAL), dst = cd_tensor(g, 0, BF, ss, sst, CD_VIRTUAL);
        cudnnBackendDescriptor_t k = cd_tensor(g, 0, BF, qd, qs, CD_VIRTUAL);
        cd_matmul(g, dout, vt, dp);
        cd_pointwise(g, CUDNN_POINTWISE_MUL, F, dp, onev, NULL, dp1);
        cd_pointwise(g, CUDNN_POINTWISE_SUB, F, dp1, d, NULL, dp2);
        cd_pointwise(g, CUDNN_POINTWISE_MUL, F, dp2, p, NULL, ds0);
        cd_pointwise(g, CUDNN_POINTWISE_MUL, F, ds0, scale, NULL, ds);
        cd_reshape(g, ds, dst);
        cd_matmul(g, dst, q, dk);
        cd_reshape(g, kt, k);
        cd_matmul(g, ds, k, dq);
    }
    cudnnBackendDescriptor_t plan = NULL;
    if (g->err_line == 0) {
        cudnnBackendDescriptor_t og = cd_new(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
        CD_SET(g, og, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &g_cudnn);
        CD_SET(g, og, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, g->nops, g->ops);
        CD_FIN(g, og);
        cudnnBackendHeurMode_t modes[2] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
        for (int mi = 0; mi < 2 && !plan && g->err_line == 0; mi++) {
            cudnnBackendDescriptor_t heur = cd_new(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
            CD_SET(g, heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &og);
            CD_SET(g, heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &modes[mi]);
            CD_FIN(g, heur);
            int64_t n = 0;
            if (g->err_line) break;
            cd_ok(g, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n, NULL), __LINE__);
            if (n > 16) n = 16;
            cudnnBackendDescriptor_t cfg[16];
            for (int i = 0; i < n; i++) cfg[i] = cd_new(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
            if (n > 0) cd_ok(g, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n, &n, cfg), __LINE__);
            for (int i = 0; i < n && !plan && g->err_line == 0; i++) {
                cudnnBackendDescriptor_t p = NULL;
                if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &p) != CUDNN_STATUS_SUCCESS) continue;
                if (cudnnBackendSetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &g_cudnn) == CUDNN_STATUS_SUCCESS &&
                    cudnnBackendSetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg[i]) == CUDNN_STATUS_SUCCESS &&
                    cudnnBackendFinalize(p) == CUDNN_STATUS_SUCCESS) {
                    int64_t n1 = 0;
                    *ws = 0;
                    cudnnBackendGetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n1, ws);
                    plan = p;
                } else {
                    cudnnBackendDestroyDescriptor(p);
                }
            }
        }
    }
    if (!plan) {
        if (g->err_line) snprintf(why, why_len, "%s at train_gpt_hc.cu:%d", cudnnGetErrorString(g->err), g->err_line);
        else snprintf(why, why_len, "no engine for the %s graph", bwd ? "backward" : "forward");
        for (int i = 0; i < g->nd; i++) if (g->d[i]) cudnnBackendDestroyDescriptor(g->d[i]);
        free(g);
    }
    return plan;   // on success the graph's descriptors stay alive with the plan (a handful per shape)
}

// plans by shape (training, validation and sampling use up to a few shapes; the tests a dozen)
#define SDPA_MAX_PLANS 64
typedef struct { int B, T, NH, bwd; cudnnBackendDescriptor_t plan; int64_t ws; } SdpaPlan;
static SdpaPlan g_sdpa_plans[SDPA_MAX_PLANS];
static int g_sdpa_nplans;
static cudnnBackendDescriptor_t sdpa_plan_for(int B, int T, int NH, int bwd, char *why, size_t why_len) {
    for (int i = 0; i < g_sdpa_nplans; i++) {
        SdpaPlan *p = &g_sdpa_plans[i];
        if (p->B == B && p->T == T && p->NH == NH && p->bwd == bwd) return p->plan;
    }
    if (!g_cudnn) {
        cudnnStatus_t s = cudnnCreate(&g_cudnn);
        if (s != CUDNN_STATUS_SUCCESS) { snprintf(why, why_len, "cudnnCreate: %s", cudnnGetErrorString(s)); g_cudnn = NULL; return NULL; }
    }
    if (g_sdpa_nplans == SDPA_MAX_PLANS) die("cuDNN attention: more than %d (B, T, heads, direction) plans in one run", SDPA_MAX_PLANS);
    int64_t ws = 0;
    cudnnBackendDescriptor_t plan = cudnn_sdpa_plan(B, T, NH, bwd, &ws, why, why_len);
    if (!plan) return NULL;
    if ((size_t)ws > g_cudnn_ws_size) {
        if (g_cudnn_ws) cudaCheck(cudaFree(g_cudnn_ws));
        g_cudnn_ws = dalloc<char>((size_t)ws);
        g_cudnn_ws_size = (size_t)ws;
    }
    g_sdpa_plans[g_sdpa_nplans++] = (SdpaPlan){B, T, NH, bwd, plan, ws};
    return plan;
}

static void sdpa_execute(cudnnBackendDescriptor_t plan, int n, const int64_t *uids, void *const *ptrs) {
    cudnnBackendDescriptor_t vp;
    cudnnCheck(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp));
    cudnnCheck(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids));
    cudnnCheck(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, ptrs));
    cudnnCheck(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &g_cudnn_ws));
    cudnnCheck(cudnnBackendFinalize(vp));
    cudnnCheck(cudnnBackendExecute(g_cudnn, plan, vp));
    cudnnCheck(cudnnBackendDestroyDescriptor(vp));
}

// stats: per (b, h, t) row max + log(sum exp) of the scaled scores (natural log), the backward's state
static void attention_forward_cudnn(floatX *out, float *stats, const floatX *qkv, int B, int T, int NH) {
    ProfScope prof(PROF_ATTENTION);
    char why[160];
    cudnnBackendDescriptor_t plan = sdpa_plan_for(B, T, NH, 0, why, sizeof(why));
    if (!plan) die("cuDNN attention: %s", why);
    size_t C = (size_t)NH * 64;
    int64_t uids[7] = {SD_Q, SD_K, SD_V, SD_O, SD_STATS, SD_SCALE, SD_LOWEST};
    void *ptrs[7] = {(void *)qkv, (void *)(qkv + C), (void *)(qkv + 2 * C), out, stats, (void *)&sd_scale, (void *)&sd_lowest};
    sdpa_execute(plan, 7, uids, ptrs);
}

static void attention_backward_cudnn(floatX *dqkv, const floatX *dout, const floatX *out, const float *stats, const floatX *qkv, int B, int T, int NH) {
    ProfScope prof(PROF_ATTENTION);
    char why[160];
    cudnnBackendDescriptor_t plan = sdpa_plan_for(B, T, NH, 1, why, sizeof(why));
    if (!plan) die("cuDNN attention backward: %s", why);
    size_t C = (size_t)NH * 64;
    int64_t uids[12] = {SD_Q, SD_K, SD_V, SD_O, SD_STATS, SD_SCALE, SD_LOWEST, SD_ONE, SD_DO, SD_DQ, SD_DK, SD_DV};
    void *ptrs[12] = {(void *)qkv, (void *)(qkv + C), (void *)(qkv + 2 * C), (void *)out, (void *)stats, (void *)&sd_scale,
                      (void *)&sd_lowest, (void *)&sd_one, (void *)dout, dqkv, dqkv + C, dqkv + 2 * C};
    sdpa_execute(plan, 12, uids, ptrs);
}
#endif

// attention implementation: cuDNN's fused SDPA (the BF16 default at head size 64), the mma.sync
// flash kernels above (GPT_HC_ATTENTION=flash, or where cuDNN has no engine for the graph), or the
// cuBLAS path (FP32 build, other head sizes, GPT_HC_ATTENTION=cublas)
enum { ATTN_CUBLAS, ATTN_FLASH, ATTN_CUDNN };
#if !defined(ENABLE_FP32)
static int g_attn = -1, g_attn_sampling;
#endif
// the sampler runs B = 1 at every length 1..T: the flash kernels need no plan per shape
static void attn_set_sampling(int on) {
#if !defined(ENABLE_FP32)
    g_attn_sampling = on;
#else
    (void)on;
#endif
}
static int attn_impl(int C, int NH, int B, int T) {
#if defined(ENABLE_FP32)
    (void)C; (void)NH; (void)B; (void)T;
    return ATTN_CUBLAS;
#else
    if (C != NH * FA_HS) return ATTN_CUBLAS;
    if (g_attn < 0) {
        const char *e = getenv("GPT_HC_ATTENTION");
        if (!e || strcmp(e, "cudnn") == 0) g_attn = ATTN_CUDNN;
        else if (strcmp(e, "flash") == 0) g_attn = ATTN_FLASH;
        else if (strcmp(e, "cublas") == 0) g_attn = ATTN_CUBLAS;
        else die("GPT_HC_ATTENTION must be cudnn, flash or cublas (got '%s')", e);
        if (g_attn == ATTN_CUDNN) {   // probe once; without an engine, say so and use the flash kernels
            char why[160];
            if (!sdpa_plan_for(B, T, NH, 0, why, sizeof(why)) || !sdpa_plan_for(B, T, NH, 1, why, sizeof(why))) {
                if (e) die("GPT_HC_ATTENTION=cudnn: %s", why);
                fprintf(stderr, "note: cuDNN attention unavailable (%s); using the flash kernels\n", why);
                g_attn = ATTN_FLASH;
            }
        }
    }
    return g_attn;
#endif
}

// out = attention(qkv); the backward state is att (cuBLAS path: the probabilities) or lse (fused:
// per-row log-sum-exp, base 2 for the flash kernels, natural for cuDNN)
static void attention_forward(floatX *out, floatX *att, float *lse, const floatX *qkv, int B, int T, int C, int NH) {
#if !defined(ENABLE_FP32)
    int impl = attn_impl(C, NH, B, T);
    if (impl == ATTN_CUDNN && g_attn_sampling) impl = ATTN_FLASH;
    if (impl == ATTN_CUDNN) { attention_forward_cudnn(out, lse, qkv, B, T, NH); return; }
    if (impl == ATTN_FLASH) { attention_forward_flash(out, lse, qkv, B, T, NH); return; }
#endif
    attention_forward_cublas(out, att, qkv, B, T, C, NH);
}

static void attention_backward(floatX *dqkv, const floatX *dout, const floatX *out, const floatX *att, const float *lse, const floatX *qkv,
                               int B, int T, int C, int NH) {
#if !defined(ENABLE_FP32)
    int impl = attn_impl(C, NH, B, T);
    if (impl == ATTN_CUDNN) { attention_backward_cudnn(dqkv, dout, out, lse, qkv, B, T, NH); return; }
    if (impl == ATTN_FLASH) { attention_backward_flash(dqkv, dout, out, lse, qkv, B, T, NH); return; }
#endif
    (void)out; (void)lse;
    attention_backward_cublas(dqkv, dout, qkv, att, B, T, C, NH);
}

// ----------------------------------------------------------------------------
// Hyper-Connection mixing (one block per token), as hc_premix/hc_postmix in train_gpt_hc.c

// The mixing kernels: one warp per token, each lane moving 16 bytes per access (C % X128 == 0)

// channels [c, c + X128) of sum_i p[i] H_i (h: the token's n rows of C)
template <int N>
__device__ __forceinline__ x128 premix_chunk(const floatX *h, const float *p, int c, int C) {
    float acc[X128];
#pragma unroll
    for (int e = 0; e < X128; e++) acc[e] = 0.0f;
#pragma unroll
    for (int i = 0; i < N; i++) {
        x128 hv = load128(h + (size_t)i * C + c);
#pragma unroll
        for (int e = 0; e < X128; e++) acc[e] += p[i] * tof(hv.v[e]);
    }
    x128 o;
#pragma unroll
    for (int e = 0; e < X128; e++) o.v[e] = tox(acc[e]);
    return o;
}

// channels of stream i of the post-mix, H'_i = post_i y + sum_j res[i][j] H_j (res row-major n x n),
// from one 16-byte chunk of each stream and of y: every kernel that forms H' (the forward's, the
// recomputation's, the backward boundary's) goes through this arithmetic, so all give the same bits
template <int N>
__device__ __forceinline__ x128 postmix_chunk(const float *res, float post_i, const x128 (&hv)[N], const x128 &yv, int i) {
    x128 o;
#pragma unroll
    for (int e = 0; e < X128; e++) {
        float sum = post_i * tof(yv.v[e]);
#pragma unroll
        for (int j = 0; j < N; j++) sum += res[i * N + j] * tof(hv[j].v[e]);
        o.v[e] = tox(sum);
    }
    return o;
}

// u = sum_i pre[i] H_i
template <int N>
__global__ void hc_premix_forward_kernel(floatX *u, const floatX *H, const float *pre, int BT, int C) {
    constexpr int n = N;
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    const floatX *h = H + (size_t)bt * n * C;
    float p[n];
#pragma unroll
    for (int i = 0; i < n; i++) p[i] = pre[(size_t)bt * n + i];
    for (int c = lane * X128; c < C; c += 32 * X128) store128(u + (size_t)bt * C + c, premix_chunk<N>(h, p, c, C));
}

// u = sum_i pre[i] H_i and the LayerNorm that starts the sublayer (out, mean, rstd), one warp per
// token: hc_premix_forward_kernel's and layernorm_forward_vec_kernel's arithmetic (the same values),
// without reading u back; u is stored only if not NULL (hc_ln_fused: the backward recomputes it).
// PN_NV 16-byte chunks per lane at most: C <= 32 * PN_NV * X128
#define PN_NV 8
// one token's row: h its n stream rows (global or shared memory), p its pre; u, out: its rows
template <int N>
__device__ __forceinline__ void premix_ln_row(floatX *u, floatX *out, float *mean, float *rstd, const floatX *h, const float *p,
                                              const floatX *w, const floatX *b, int C, int lane) {
    x128 v[PN_NV];
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < PN_NV; j++) {
        int c = (lane + 32 * j) * X128;
        if (c < C) {
            v[j] = premix_chunk<N>(h, p, c, C);
            if (u) store128(u + c, v[j]);
#pragma unroll
            for (int e = 0; e < X128; e++) s += tof(v[j].v[e]);
        }
    }
    ln_row_finish<PN_NV>(v, s, C, w, b, out, mean, rstd, lane);
}
template <int N>
__global__ void hc_premix_ln_kernel(floatX *u, floatX *out, float *mean, float *rstd, const floatX *H, const float *pre, const floatX *w,
                                    const floatX *b, int BT, int C) {
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    float p[N];
#pragma unroll
    for (int i = 0; i < N; i++) p[i] = pre[(size_t)bt * N + i];
    premix_ln_row<N>(u ? u + (size_t)bt * C : NULL, out + (size_t)bt * C, mean + bt, rstd + bt, H + (size_t)bt * N * C, p, w, b, C, lane);
}

// dH += pre (x) du; dpre[i] = du . H_i
template <int N>
// dpre, and dH += pre_i du unless dH is NULL (mHC's tensor-core backward adds that term itself)
__global__ void hc_premix_backward_kernel(floatX *dH, float *dpre, const floatX *du, const floatX *H, const float *pre, int BT, int C) {
    constexpr int n = N;
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    const floatX *h = H + (size_t)bt * n * C;
    floatX *dh = dH + (size_t)bt * n * C;
    float acc[n], p[n];
#pragma unroll
    for (int i = 0; i < n; i++) { acc[i] = 0.0f; p[i] = pre[(size_t)bt * n + i]; }
    for (int c = lane * X128; c < C; c += 32 * X128) {
        x128 dv = load128(du + (size_t)bt * C + c);
#pragma unroll
        for (int i = 0; i < n; i++) {
            x128 hv = load128(h + (size_t)i * C + c), gv;
            if (dH) gv = load128(dh + (size_t)i * C + c);
#pragma unroll
            for (int e = 0; e < X128; e++) {
                float d = tof(dv.v[e]);
                acc[i] += d * tof(hv.v[e]);
                if (dH) gv.v[e] = tox(tof(gv.v[e]) + p[i] * d);
            }
            if (dH) store128(dh + (size_t)i * C + c, gv);
        }
    }
#pragma unroll
    for (int i = 0; i < n; i++) {
        float v = warp_sum(acc[i]);
        if (lane == 0) dpre[(size_t)bt * n + i] = v;
    }
}

// The sublayer's LayerNorm backward and the pre-mix backward in one pass over the token, one warp
// each, so that u is neither stored by the forward nor read here (25 + 25 MB per d12 sublayer) and
// du is not read back (25 MB): u = sum_i pre_i H_i is recomputed by premix_chunk (the forward's
// bf16 values), du is layernorm_backward_vec_kernel's (write mode), dpre_i = du . H_i
// hc_premix_backward_kernel's, and with dH also dH += pre_i du. dw, db: each warp sums its rows in
// shared memory in the order it meets them, then the warps are added in order into
// partial[block][2C]: the LayerNorm backward's sums, bit for bit (layernorm_param_finish
// adds the blocks). H's row is read twice, the second time right after the first (from cache).
#define LP_NV 4   // 16-byte chunks a lane holds at most: C <= 32 LP_NV X128 (1024 in bf16; wider rows store u)
template <int N>
__global__ void __launch_bounds__(32 * LN_BWD_WARPS) hc_ln_premix_backward_kernel(floatX *du, float *dpre, float *partial, floatX *dH,
                                                                                  const floatX *dout, const floatX *H, const float *pre,
                                                                                  const floatX *w, const float *mean, const float *rstd,
                                                                                  int BT, int C) {
    // per warp: dw then db, lane-minor (element e of the lane's chunk j at (j X128 + e) 32 + lane: no
    // bank conflicts), CP floats each (C rounded up to whole rounds of 32 chunks)
    extern __shared__ float lp_acc[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nv = C / X128, CP = (nv + 31) / 32 * 32 * X128;
    float *acc = lp_acc + (size_t)warp * 2 * CP;
    for (int i = lane; i < 2 * CP; i += 32) acc[i] = 0.0f;
    for (int bt = blockIdx.x * LN_BWD_WARPS + warp; bt < BT; bt += gridDim.x * LN_BWD_WARPS) {
        const floatX *h = H + (size_t)bt * N * C, *d = dout + (size_t)bt * C;
        float p[N], m = mean[bt], s = rstd[bt], a = 0.0f, bs = 0.0f, dp[N];
#pragma unroll
        for (int i = 0; i < N; i++) { p[i] = pre[(size_t)bt * N + i]; dp[i] = 0.0f; }
        x128 dv[LP_NV], xv[LP_NV];
#pragma unroll
        for (int j = 0; j < LP_NV; j++) {
            int i = lane + 32 * j;
            if (i < nv) {
                dv[j] = load128(d + i * X128);
                xv[j] = premix_chunk<N>(h, p, i * X128, C);
                ln_bwd_chunk_sums(a, bs, load128(w + i * X128), dv[j], xv[j], m, s);
            }
        }
        float dn_mean = warp_sum(a) / C, dn_xhat = warp_sum(bs) / C;
#pragma unroll
        for (int j = 0; j < LP_NV; j++) {
            int i = lane + 32 * j;
            if (i < nv) {
                x128 wv = load128(w + i * X128), gv;
#pragma unroll
                for (int e = 0; e < X128; e++) gv.v[e] = tox(0.0f);
#pragma unroll
                for (int e = 0; e < X128; e++) {
                    float xhat = (tof(xv[j].v[e]) - m) * s, g = tof(dv[j].v[e]);
                    gv.v[e] = tox(tof(gv.v[e]) + ln_bwd_dx(tof(wv.v[e]), g, xhat, s, dn_mean, dn_xhat));
                    acc[(j * X128 + e) * 32 + lane] += g * xhat;
                    acc[CP + (j * X128 + e) * 32 + lane] += g;
                }
                store128(du + (size_t)bt * C + i * X128, gv);
#pragma unroll
                for (int q = 0; q < N; q++) {   // the pre-mix backward on this chunk
                    x128 hv = load128(h + (size_t)q * C + i * X128), gh;
                    floatX *dh = dH ? dH + ((size_t)bt * N + q) * C + i * X128 : NULL;
                    if (dH) gh = load128(dh);
#pragma unroll
                    for (int e = 0; e < X128; e++) {
                        float dd = tof(gv.v[e]);
                        dp[q] += dd * tof(hv.v[e]);
                        if (dH) gh.v[e] = tox(tof(gh.v[e]) + p[q] * dd);
                    }
                    if (dH) store128(dh, gh);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < N; q++) {
            float v = warp_sum(dp[q]);
            if (lane == 0) dpre[(size_t)bt * N + q] = v;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) {   // channel i % C: the warps in order
        int c = i % C, q = c / X128, at = (i / C) * CP + ((q / 32) * X128 + c % X128) * 32 + q % 32;
        float t = 0.0f;
        for (int ww = 0; ww < LN_BWD_WARPS; ww++) t += lp_acc[(size_t)ww * 2 * CP + at];
        partial[(size_t)blockIdx.x * 2 * C + i] = t;
    }
}

// whether an HC sublayer's LayerNorm backward runs inside the pre-mix backward
// (hc_ln_premix_backward_kernel; u is then not stored: the forward's hc_premix_ln_kernel, which
// takes rows up to 32 PN_NV X128, skips it)
static int g_ln_fused = 1;   // 0: u stored and the two backward kernels apart (tests)
static int hc_ln_fused(int C) { return g_ln_fused && C <= 32 * LP_NV * X128; }

template <int N = 1>
static void lp_set_smem(int smem) {   // every n's instantiation
    if constexpr (N <= 8) {
        cudaCheck(cudaFuncSetAttribute(hc_ln_premix_backward_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        lp_set_smem<N + 1>(smem);
    }
}

// du, dpre, dw/db += the LayerNorm's parameter gradients, and with dH: dH += pre_i du (see
// hc_ln_premix_backward_kernel)
static void hc_ln_premix_backward(int n, floatX *du, float *dpre, floatX *dH, float *dw, float *db, const floatX *dout, const floatX *H,
                                  const float *pre, const floatX *w, const float *mean, const float *rstd, int BT, int C) {
    ProfScope prof(PROF_HC);
    if (C > 32 * LP_NV * X128) die("internal: the fused LayerNorm + pre-mix backward takes C <= %d (C=%d)", 32 * LP_NV * X128, C);
    int nblocks = (int)min((unsigned)256, ceil_div(BT, LN_BWD_WARPS * 4));   // layernorm_backward's blocks: the same sums
    float *partial = (float *)dscratch(3, (size_t)nblocks * 2 * C * sizeof(float));
    int smem = LN_BWD_WARPS * 2 * ceil_div(C / X128, 32) * 32 * X128 * (int)sizeof(float);
    static int attr = 0;
    if (smem > 48 * 1024 && smem > attr) {   // rows over 768 (bf16): over the 48 KB default
        lp_set_smem(smem);
        attr = smem;
    }
    DISPATCH_N_SMEM(n, hc_ln_premix_backward_kernel, nblocks, 32 * LN_BWD_WARPS, smem, du, dpre, partial, dH, dout, H, pre, w, mean, rstd,
                    BT, C);
    layernorm_param_finish(dw, db, partial, C, nblocks);
    kernelCheck();
}

// H'_i = sum_j res[i][j] H_j + post[i] y
// sum: Hout is h = sum_i H'_i [BT, C] instead of H' (the last sublayer: H^K is only summed), added
// in stream order from the bf16 H'_i: the bits of storing H' and summing its streams
template <int N>
__global__ void hc_postmix_forward_kernel(floatX *Hout, const floatX *H, const floatX *y, const float *post, const float *res, int BT, int C,
                                          int sum = 0) {
    constexpr int n = N;
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    const floatX *h = H + (size_t)bt * n * C;
    float r[n * n], p[n];
#pragma unroll
    for (int q = 0; q < n * n; q++) r[q] = res[(size_t)bt * n * n + q];
#pragma unroll
    for (int i = 0; i < n; i++) p[i] = post[(size_t)bt * n + i];
    for (int c = lane * X128; c < C; c += 32 * X128) {
        x128 yv = load128(y + (size_t)bt * C + c), hv[n];
#pragma unroll
        for (int j = 0; j < n; j++) hv[j] = load128(h + (size_t)j * C + c);
        if (sum) {
            float acc[X128] = {};
#pragma unroll
            for (int i = 0; i < n; i++) add128(acc, postmix_chunk<N>(r, p[i], hv, yv, i));
            store128(Hout + (size_t)bt * C + c, pack128(acc));
            continue;
        }
#pragma unroll
        for (int i = 0; i < n; i++) store128(Hout + ((size_t)bt * n + i) * C + c, postmix_chunk<N>(r, p[i], hv, yv, i));
    }
}

// sum_i res[i][j] d_i over 16 bytes of channels (the post-mix backward's dH_j)
template <int N>
__device__ __forceinline__ x128 res_t_mix(const float *res, const x128 (&d)[N], int j) {
    x128 g;
#pragma unroll
    for (int e = 0; e < X128; e++) {
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < N; i++) sum += res[i * N + j] * tof(d[i].v[e]);
        g.v[e] = tox(sum);
    }
    return g;
}

// dH_j += sum_i res[i][j] dH'_i; dy = sum_i post[i] dH'_i (overwritten); dpost, dres written.
// bcast: dHout is one row per token [BT, C], every stream's gradient (the last sublayer, whose
// output only enters h = sum_i H^K_i): read n times from L1 instead of n copies from memory
template <int N>
__global__ void hc_postmix_backward_kernel(floatX *dH, floatX *dy, float *dpost, float *dres, const floatX *dHout, const floatX *H,
                                           const floatX *y, const float *post, const float *res, int BT, int C, int bcast = 0) {
    constexpr int n = N;
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    size_t ds = bcast ? 0 : C;   // the stride between the streams' gradients
    const floatX *h = H + (size_t)bt * n * C, *d = dHout + (size_t)bt * (bcast ? 1 : n) * C;
    float r[n * n], p[n], acc[n + n * n];
#pragma unroll
    for (int q = 0; q < n * n; q++) r[q] = res[(size_t)bt * n * n + q];
#pragma unroll
    for (int i = 0; i < n; i++) p[i] = post[(size_t)bt * n + i];
#pragma unroll
    for (int q = 0; q < n + n * n; q++) acc[q] = 0.0f;
    for (int c = lane * X128; c < C; c += 32 * X128) {
        x128 yv = load128(y + (size_t)bt * C + c), dv[n], hv[n], dyo;
#pragma unroll
        for (int i = 0; i < n; i++) { dv[i] = load128(d + i * ds + c); hv[i] = load128(h + (size_t)i * C + c); }
#pragma unroll
        for (int e = 0; e < X128; e++) {
            float yy = tof(yv.v[e]), dyv = 0.0f;
#pragma unroll
            for (int i = 0; i < n; i++) {
                float di = tof(dv[i].v[e]);
                acc[i] += di * yy;
                dyv += p[i] * di;
#pragma unroll
                for (int j = 0; j < n; j++) acc[n + i * n + j] += di * tof(hv[j].v[e]);
            }
            dyo.v[e] = tox(dyv);
        }
        store128(dy + (size_t)bt * C + c, dyo);
#pragma unroll
        for (int j = 0; j < n; j++)   // the first writer of dH^k in the backward: written, not accumulated
            store128(dH + ((size_t)bt * n + j) * C + c, res_t_mix<N>(r, dv, j));
    }
#pragma unroll
    for (int q = 0; q < n + n * n; q++) {
        float v = warp_sum(acc[q]);
        if (lane == 0) {
            if (q < n) dpost[(size_t)bt * n + q] = v;
            else dres[(size_t)bt * n * n + (q - n)] = v;
        }
    }
}


// the same for KERNEL<n, true> (the dhc variants of the mhc tensor-core kernels; n even)
#define DISPATCH_N_DHC(n, KERNEL, GRID, BLOCK, ...)                                         \
    do {                                                                                    \
        switch (n) {                                                                        \
            case 2: KERNEL<2, true><<<GRID, BLOCK>>>(__VA_ARGS__); break;                   \
            case 4: KERNEL<4, true><<<GRID, BLOCK>>>(__VA_ARGS__); break;                   \
            case 6: KERNEL<6, true><<<GRID, BLOCK>>>(__VA_ARGS__); break;                   \
            case 8: KERNEL<8, true><<<GRID, BLOCK>>>(__VA_ARGS__); break;                   \
            default: die("internal: the fused dhc kernels need an even n (n=%d)", (int)(n)); \
        }                                                                                   \
        kernelCheck();                                                                      \
    } while (0)

// ----------------------------------------------------------------------------
// coefficients. shc: static (SPEC 2.2), res[j][i] = A[i][1+j]

__global__ void shc_coeffs_forward_kernel(float *pre, float *post, float *res, const float *A, const float *b, int BT, int n) {
    int bt = blockIdx.x * blockDim.x + threadIdx.x;
    if (bt >= BT) return;
    for (int i = 0; i < n; i++) {
        pre[(size_t)bt * n + i] = A[i * (n + 1)];
        post[(size_t)bt * n + i] = b[i];
        for (int j = 0; j < n; j++) res[(size_t)bt * n * n + j * n + i] = A[i * (n + 1) + 1 + j];
    }
}

// per-token rows of the static-parameter gradients, summed over tokens by colsum:
// [dA (n x (n+1)) | db (n) | dsa | dsb] (the last two used by dhc)
__global__ void hc_small_grads_kernel(float *rows, const float *dpre, const float *dpost, const float *dres,
                                      const float *ta, const float *tb, int BT, int n) {
    int bt = blockIdx.x * blockDim.x + threadIdx.x;
    if (bt >= BT) return;
    int n1 = n + 1, w = n * n1 + n + 2;
    float *row = rows + (size_t)bt * w, dsa = 0.0f, dsb = 0.0f;
    for (int i = 0; i < n; i++) {
        for (int q = 0; q < n1; q++) {
            float dAt = q == 0 ? dpre[(size_t)bt * n + i] : dres[(size_t)bt * n * n + (q - 1) * n + i];
            row[i * n1 + q] = dAt;
            if (ta) dsa += dAt * ta[((size_t)bt * n + i) * n1 + q];
        }
        float dbt = dpost[(size_t)bt * n + i];
        row[n * n1 + i] = dbt;
        if (tb) dsb += dbt * tb[(size_t)bt * n + i];
    }
    row[n * n1 + n] = dsa;
    row[n * n1 + n + 1] = dsb;
}

__global__ void hc_small_grads_scatter_kernel(float *dA, float *db, float *dsa, float *dsb, const float *sums, int n) {
    int n1 = n + 1;
    for (int q = threadIdx.x; q < n * n1 + n + 2; q += blockDim.x) {
        if (q < n * n1) dA[q] += sums[q];
        else if (q < n * n1 + n) db[q - n * n1] += sums[q];
        else if (q == n * n1 + n) { if (dsa) dsa[0] += sums[q]; }
        else if (dsb) dsb[0] += sums[q];
    }
}

// dhc (SPEC 2.2): one warp per (token, stream) row of H. Lanes take consecutive channels, so the
// per-channel parameter loads (Wa, Wb, lnw, lnb) coalesce; a version with 16-byte loads of H and
// 8 channels per lane made those loads scatter over 32 cache lines and ran 2.4x slower.
template <int N>
__global__ void dhc_coeffs_forward_kernel(float *pre, float *post, float *res, float *mean, float *rstd, float *ta, float *tb,
                                          const floatX *H, const float *A, const float *b, const float *lnw, const float *lnb,
                                          const float *Wa, const float *Wb, const float *sa, const float *sb, int R, int C) {
    constexpr int n = N, n1 = N + 1;
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= R) return;
    int bt = r / n, i = r % n;
    const floatX *x = H + (size_t)r * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += tof(x[c]);
    float m = warp_sum(s) / C, v = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = tof(x[c]) - m; v += d * d; }
    float rs = rsqrtf(warp_sum(v) / C + 1e-5f);
    float da[n1 + 1];
#pragma unroll
    for (int q = 0; q <= n1; q++) da[q] = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float nv = (tof(x[c]) - m) * rs * lnw[c] + lnb[c];
#pragma unroll
        for (int q = 0; q < n1; q++) da[q] += nv * Wa[c * n1 + q];
        da[n1] += nv * Wb[c];
    }
#pragma unroll
    for (int q = 0; q <= n1; q++) da[q] = warp_sum(da[q]);
    if (lane == 0) {
        mean[r] = m;
        rstd[r] = rs;
        float *t = ta + (size_t)r * n1;
#pragma unroll
        for (int q = 0; q < n1; q++) t[q] = tanhf(da[q]);
        tb[r] = tanhf(da[n1]);
        pre[r] = A[i * n1] + sa[0] * t[0];
        post[r] = b[i] + sb[0] * tb[r];
#pragma unroll
        for (int j = 0; j < n; j++) res[(size_t)bt * n * n + j * n + i] = A[i * n1 + 1 + j] + sa[0] * t[1 + j];
    }
}

// gate gradients g (n+2 per row), then LayerNorm backward into dH; one warp per row
template <int N>
__global__ void dhc_coeffs_backward_kernel(floatX *dH, float *g, const float *dpre, const float *dpost, const float *dres,
                                           const floatX *H, const float *mean, const float *rstd, const float *ta, const float *tb,
                                           const float *lnw, const float *Wa, const float *Wb, const float *sa, const float *sb, int R, int C) {
    constexpr int n = N, n1 = N + 1, ng = N + 2;
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= R) return;
    int bt = r / n, i = r % n;
    float gr[ng];
    const float *t = ta + (size_t)r * n1;
#pragma unroll
    for (int q = 0; q < n1; q++) {
        float dAt = q == 0 ? dpre[r] : dres[(size_t)bt * n * n + (q - 1) * n + i];
        gr[q] = dAt * sa[0] * (1.0f - t[q] * t[q]);
    }
    gr[n1] = dpost[r] * sb[0] * (1.0f - tb[r] * tb[r]);
    if (lane < ng) {
#pragma unroll
        for (int q = 0; q < ng; q++) if (q == lane) g[(size_t)r * ng + q] = gr[q];
    }
    const floatX *x = H + (size_t)r * C;
    float m = mean[r], s = rstd[r], a = 0.0f, bb = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dN = gr[n1] * Wb[c];
#pragma unroll
        for (int q = 0; q < n1; q++) dN += gr[q] * Wa[c * n1 + q];
        float dn = dN * lnw[c];
        a += dn;
        bb += dn * (tof(x[c]) - m) * s;
    }
    float dn_mean = warp_sum(a) / C, dn_xhat = warp_sum(bb) / C;
    for (int c = lane; c < C; c += 32) {
        float dN = gr[n1] * Wb[c];
#pragma unroll
        for (int q = 0; q < n1; q++) dN += gr[q] * Wa[c * n1 + q];
        size_t o = (size_t)r * C + c;
        dH[o] = tox(tof(dH[o]) + s * (dN * lnw[c] - dn_mean - (tof(x[c]) - m) * s * dn_xhat));
    }
}

// per-channel parameter grads of dhc over a chunk of rows (one thread per channel: a version with
// 16-byte loads and 8 channels per thread had 8x fewer threads and ran 2.4x slower): partial[chunk][c][0..n] Wa, [n+1] Wb,
// [n+2] lnw, [n+3] lnb
template <int N>
__global__ void dhc_param_partial_kernel(float *partial, const float *g, const floatX *H, const float *mean, const float *rstd,
                                         const float *lnw, const float *lnb, const float *Wa, const float *Wb,
                                         int R, int n_rt, int C, int chunk) {
    constexpr int n = N;   // streams as a compile-time constant: loops unroll, arrays stay in registers
    int c = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y, n1 = n + 1, ng = n + 2, w = n + 4;
    if (c >= C) return;
    float acc[MAX_STREAMS + 4];
    for (int q = 0; q < w; q++) acc[q] = 0.0f;
    int r1 = min(R, (ch + 1) * chunk);
    for (int r = ch * chunk; r < r1; r++) {
        const float *gr = g + (size_t)r * ng;
        float xhat = (tof(H[(size_t)r * C + c]) - mean[r]) * rstd[r];
        float nv = xhat * lnw[c] + lnb[c];
        float dN = gr[n1] * Wb[c];
        for (int q = 0; q < n1; q++) { acc[q] += nv * gr[q]; dN += gr[q] * Wa[c * n1 + q]; }
        acc[n1] += nv * gr[n1];
        acc[n1 + 1] += dN * xhat;
        acc[n1 + 2] += dN;
    }
    for (int q = 0; q < w; q++) partial[((size_t)ch * C + c) * w + q] = acc[q];
}

// sums the chunk partials in chunk order, one thread per (channel, quantity)
__global__ void dhc_param_finish_kernel(float *dWa, float *dWb, float *dlnw, float *dlnb, const float *partial, int n, int C, int nchunks) {
    int w = n + 4, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C * w) return;
    int c = j / w, q = j % w, n1 = n + 1;
    float acc = 0.0f;
    for (int ch = 0; ch < nchunks; ch++) acc += partial[(size_t)ch * C * w + j];
    if (q < n1) dWa[c * n1 + q] += acc;
    else if (q == n1) dWb[c] += acc;
    else if (q == n1 + 1) dlnw[c] += acc;
    else dlnb[c] += acc;
}

// mhc (SPEC 2.3). Sinkhorn-Knopp in fp32 with one thread per matrix row: G (n rounded up to a power
// of two) threads per token, so a warp holds 32 / G tokens. A row sum is a thread's own; a column sum
// is a butterfly over the group (every lane gets the same bits: each addition pairs the same two
// partial sums). One thread per token left 16k threads on the GPU, 4 warps per SM, each waiting out
// the latency of a 40-half-step chain: 21 us per forward call, 37 per backward at n = 4.
// The backward recomputes the iterations (see train_gpt_hc.c).
__host__ __device__ constexpr int sk_group(int n) { return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8; }
template <int N> struct SkGroup { static constexpr int G = sk_group(N); };

// v[0..LEN) summed over the G threads of the group, every thread receiving the sums (all lanes of
// the warp must take part)
template <int N, int LEN = N>
__device__ __forceinline__ void group_sum(float *v) {
#pragma unroll
    for (int o = 1; o < SkGroup<N>::G; o <<= 1)
#pragma unroll
        for (int b = 0; b < LEN; b++) v[b] += __shfl_xor_sync(0xffffffff, v[b], o);
}
template <int N>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int o = 1; o < SkGroup<N>::G; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// M: row a of exp(X - max) on entry (zeros on idle lanes), of the doubly stochastic result on exit.
// Columns first, then rows, iters times. With S, thread a keeps the sum it owns per half-step at
// S[h * stride]: column a's sum (h even) and row a's (h odd)
template <int N>
__device__ void sinkhorn_rows(float *M, int a, bool live, int iters, float *S, int stride) {
    for (int it = 0; it < iters; it++) {
        float cs[N], mine = 0.0f;
#pragma unroll
        for (int b = 0; b < N; b++) cs[b] = live ? M[b] : 0.0f;
        group_sum<N>(cs);
#pragma unroll
        for (int b = 0; b < N; b++) { M[b] *= 1.0f / cs[b]; mine = b == a ? cs[b] : mine; }
        if (S && live) S[(size_t)(2 * it) * stride] = mine;
        float rs = 0.0f;
#pragma unroll
        for (int b = 0; b < N; b++) rs += M[b];
        float inv = 1.0f / rs;
#pragma unroll
        for (int b = 0; b < N; b++) M[b] *= inv;
        if (S && live) S[(size_t)(2 * it + 1) * stride] = rs;
    }
}

// rms of vec(H) per token, one warp each
__global__ void rms_kernel(float *rms, const floatX *H, int BT, int nC) {
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    const floatX *x = H + (size_t)bt * nC;
    float ss = 0.0f;
    for (int q = lane; q < nC; q += 32) { float v = tof(x[q]); ss += v * v; }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (lane == 0) rms[bt] = sqrtf(ss / nC + 1e-6f);
}

// row a of token bt's gates from its product row pp (m values) and rms r: z = p / r (the Sinkhorn
// logits' part too, for part 2), pre_a and post_a; returns pre_a (shared by the coefficient kernel
// and the forward boundary kernel)
template <int N>
__device__ __forceinline__ float mhc_gates_row(float *pre, float *post, float *zz, const float *pp, float r, const float *bias,
                                               const float *alpha, size_t bt, int a) {
    constexpr int n = N;
    float z0 = pp[a] / r, z1 = pp[n + a] / r;
    zz[a] = z0;
    zz[n + a] = z1;
    float pr = 1.0f / (1.0f + expf(-(alpha[0] * z0 + bias[a])));
    pre[bt * n + a] = pr;
    post[bt * n + a] = 2.0f / (1.0f + expf(-(alpha[1] * z1 + bias[n + a])));
#pragma unroll
    for (int b = 0; b < n; b++) zz[2 * n + a * n + b] = pp[2 * n + a * n + b] / r;
    return pr;
}

// per (token, row a): z = p / r from vec(H) @ phi, the sigmoid gates (entry a of pre and post) and
// row a of Sinkhorn-Knopp, in fp32; grid over BT * G threads. part 1: z and the gates; part 2:
// Sinkhorn-Knopp from the z that part 1 stored (the trainer runs it on the coefficient stream: it
// reads no scratch); 3: both
template <int N>
__global__ void mhc_coeffs_forward_kernel(float *pre, float *post, float *res, const float *rms, float *z, const float *p,
                                          const float *bias, const float *alpha, int BT, int n_rt, int iters, int part) {
    constexpr int n = N, m = N * N + 2 * N, G = SkGroup<N>::G;
    int gt = blockIdx.x * blockDim.x + threadIdx.x, bt = gt / G, a = gt % G;
    bool live = bt < BT && a < n;
    float *zz = z + (size_t)(live ? bt : 0) * m, X[n], M[n], mx = -FLT_MAX;
    if (live && (part & 1)) mhc_gates_row<N>(pre, post, zz, p + (size_t)bt * m, rms[bt], bias, alpha, bt, a);
    if (!(part & 2)) return;   // the same for every thread
    if (live)
#pragma unroll
        for (int b = 0; b < n; b++) {
            int q = 2 * n + a * n + b;
            X[b] = alpha[2] * zz[q] + bias[q];
            mx = fmaxf(mx, X[b]);
        }
    mx = group_max<N>(mx);
#pragma unroll
    for (int b = 0; b < n; b++) M[b] = live ? expf(X[b] - mx) : 0.0f;
    sinkhorn_rows<N>(M, a, live, iters, NULL, 0);
    if (live)
#pragma unroll
        for (int b = 0; b < n; b++) res[(size_t)bt * n * n + a * n + b] = M[b];
}

// per (token, row a): logit gradients g through the gates and Sinkhorn (the iterations recomputed,
// their line sums kept), dp = alpha g / r (floatX, for the dH pass), kx = dr / (nC r) for the rms
// term, and a row [g | g.z per alpha] for dbias/dalpha; grid over BT * G threads. part 1: the
// Sinkhorn backward alone, its g (row a of the res logits' gradients) written over dres in place:
// it needs only dres, so the trainer runs it on the coefficient stream during the sublayer's
// backward; part 2: the rest, reading that g; 3: both
static int g_sk_smem = 1;   // 0: the Sinkhorn sums of the backward in global memory even when they fit on chip (tests)
template <int N>
__global__ void mhc_coeffs_backward_kernel(floatX *dpx_out, float *kx_out, float *rows, const float *dpre, const float *dpost,
                                           float *dres, const float *pre, const float *post, const float *rms, const float *z,
                                           const float *bias, const float *alpha, int BT, int n_rt, int C, int iters, float *work, int part) {
    constexpr int n = N, m = n * n + 2 * n, nn = n * n, G = SkGroup<N>::G;
    int gt = blockIdx.x * blockDim.x + threadIdx.x, bt = gt / G, a = gt % G;
    bool live = bt < BT && a < n;
    const float *zz = z + (size_t)(live ? bt : 0) * m;
    float gres[n];
    if (part & 1) {
        float X[n], M[n], d[n], mx = -FLT_MAX;
        if (live)
#pragma unroll
            for (int b = 0; b < n; b++) { X[b] = alpha[2] * zz[2 * n + a * n + b] + bias[2 * n + a * n + b]; mx = fmaxf(mx, X[b]); }
        mx = group_max<N>(mx);
#pragma unroll
        for (int b = 0; b < n; b++) M[b] = live ? expf(X[b] - mx) : 0.0f;
        // the forward again, keeping only each half-step's line sums: walking back, the matrix before
        // half-step h is the one after it with each line multiplied by its sum again, so no matrix is
        // stored. Thread j of a group keeps column j's and row j's sums; the sums live in shared memory
        // when they fit (work == NULL), else in work (coalesced: consecutive threads, consecutive floats)
        extern __shared__ float sk_sums[];
        float *S = work ? work + gt : sk_sums + threadIdx.x;
        int stride = work ? gridDim.x * blockDim.x : blockDim.x;
        sinkhorn_rows<N>(M, a, live, iters, S, stride);
        __syncwarp();   // the group reads each other's column sums below
        const float *Sg = S - a;
#pragma unroll
        for (int b = 0; b < n; b++) d[b] = live ? dres[(size_t)bt * nn + a * n + b] : 0.0f;
        for (int h = 2 * iters - 1; h >= 0; h--) {   // M holds the matrix after half-step h
            if (h % 2) {   // a row normalization: this thread's row
                float sv = live ? S[(size_t)h * stride] : 1.0f, iv = 1.0f / sv, dot = 0.0f;
#pragma unroll
                for (int b = 0; b < n; b++) dot += d[b] * M[b];
#pragma unroll
                for (int b = 0; b < n; b++) { d[b] = (d[b] - dot) * iv; M[b] *= sv; }
            } else {       // a column normalization: the dots over each column, summed over the group
                float dot[n];
#pragma unroll
                for (int b = 0; b < n; b++) dot[b] = live ? d[b] * M[b] : 0.0f;
                group_sum<N>(dot);
#pragma unroll
                for (int b = 0; b < n; b++) {
                    float sv = live ? Sg[(size_t)h * stride + b] : 1.0f;
                    d[b] = (d[b] - dot[b]) * (1.0f / sv);
                    M[b] *= sv;
                }
            }
        }
#pragma unroll
        for (int b = 0; b < n; b++) gres[b] = d[b] * M[b];   // g = d o M, M = exp(X - max)
        if (!(part & 2)) {
            if (live)
#pragma unroll
                for (int b = 0; b < n; b++) dres[(size_t)bt * nn + a * n + b] = gres[b];
            return;
        }
    } else {
#pragma unroll
        for (int b = 0; b < n; b++) gres[b] = live ? dres[(size_t)bt * nn + a * n + b] : 0.0f;
    }
    // this thread's entries: pre a, post a and row a of res
    float r = rms[live ? bt : 0], acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // dr, then sum g z per alpha
    if (live) {
        float sg = pre[(size_t)bt * n + a], p2 = post[(size_t)bt * n + a];
        float gpre = dpre[(size_t)bt * n + a] * sg * (1.0f - sg), gpost = dpost[(size_t)bt * n + a] * p2 * (1.0f - 0.5f * p2);
        float *row = rows + (size_t)bt * (m + 3);
        floatX *dpx = dpx_out + (size_t)bt * m;
#pragma unroll
        for (int e = 0; e < n + 2; e++) {
            int k = e == 0 ? a : e == 1 ? n + a : 2 * n + a * n + (e - 2), w = e < 2 ? e : 2;
            float g = e == 0 ? gpre : e == 1 ? gpost : gres[e - 2], dz = alpha[w] * g;
            dpx[k] = tox(dz / r);
            acc[0] -= dz * zz[k] / r;
            row[k] = g;
            acc[1 + w] += g * zz[k];
        }
    }
    group_sum<N, 4>(acc);
    if (live && a == 0) {
        float *row = rows + (size_t)bt * (m + 3);
        for (int w = 0; w < 3; w++) row[m + w] = acc[1 + w];
        kx_out[bt] = acc[0] / ((float)(n * C) * r);   // d r / d x = x / (nC r)
    }
}

// dH += kx[token] * H (the rms term of dx); grid (tokens, chunks of nC), 16-byte accesses
__global__ void mhc_rms_backward_kernel(floatX *dH, const floatX *H, const float *kx, int nC) {
    int bt = blockIdx.x, q = (blockIdx.y * blockDim.x + threadIdx.x) * X128;
    if (q >= nC) return;
    size_t i = (size_t)bt * nC + q;
    x128 h = load128(H + i), d = load128(dH + i);
    float k = kx[bt];
#pragma unroll
    for (int e = 0; e < X128; e++) d.v[e] = tox(tof(d.v[e]) + k * tof(h.v[e]));
    store128(dH + i, d);
}

// what sublayer k - 1's post-mix backward reads and writes, for the fused boundary (NULL: not fused)
struct HcPrev {
    floatX *dH, *dy;   // dH^{k-1} (first term), dy^{k-1}
    float *dpost, *dres;
    const floatX *H, *y;   // H^{k-1}, y^{k-1}
    const float *post, *res;
};

#if !defined(ENABLE_FP32)
// mHC's two skinny products on tensor cores (bf16 build, nC % 64 == 0). cuBLAS ran them at 2-5x
// their memory floor (m = n^2 + 2n is 24 at n = 4) and needed separate passes for the rms terms.
// forward: p = vec(H) @ phi (fp32) and rms = sqrt(mean(H^2) + 1e-6) in one pass over H;
// backward: dH += dp @ phi^T + kx * H in one pass (dp, kx from mhc_coeffs_backward_kernel).
#define MP_LD 72   // H tiles: 64 bf16 + 8 of padding per row (as the attention tiles)

// One 64-wide k chunk of the projection for a warp's 16 rows: acc (16 x m) += A (16 rows x 64 in
// shared memory, rows of MP_LD) @ P (64 phi rows x m, rows of PLD), and ss (with DHC also sx) +=
// the squares (sums) of A's values for rows lane/4 and lane/4 + 8, taken from the same fragments
template <int MT, int PLD, bool DHC>
__device__ __forceinline__ void proj_chunk(float (&acc)[MT][4], float (&ss)[2], float (&sx)[2], const floatX *A, const floatX *P, int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint32_t a[4];
        ldsm_x4(a, A + (lane % 16) * MP_LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int q = 0; q < 4; q++) {   // a[0], a[2]: row lane/4; a[1], a[3]: row lane/4 + 8
            __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162 *>(&a[q]);
            float x0 = __low2float(v), x1 = __high2float(v);
            ss[q % 2] += x0 * x0 + x1 * x1;
            if (DHC) sx[q % 2] += x0 + x1;
        }
#pragma unroll
        for (int j = 0; j < MT; j++) {
            uint32_t b[2];
            ldsm_x2_t(b, P + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * PLD + j * 8);
            mma_bf16(acc[j], a, b[0], b[1]);
        }
    }
}

// grid: ceil(BT / 64) blocks of 128 threads; each warp owns 16 tokens, k runs over nC in chunks of
// 64 through a 3-stage cp.async pipeline (H tile and phi rows together; 2 stages for n > 4, whose
// wider phi rows would pass the 48 KB of static shared memory)
// DHC: dhc's block-diagonal projection (see dhc_phi_kernel): rms is then the per-(token, stream)
// LayerNorm mean and rstd the rstd, from the sum and sum of squares of each C-long stream row
template <int N, bool DHC = false>
__global__ void __launch_bounds__(128) mhc_proj_forward_kernel(float *p, float *rms, float *rstd, const floatX *H, const floatX *phi,
                                                               int BT, int nC, int C) {
    // launched only for m % 8 == 0 (hc_tensor_cores); MT is clamped so odd n still compiles
    constexpr int m = N * N + 2 * N, MT = m / 8 > 0 ? m / 8 : 1, PLD = 8 * (MT | 1);   // odd 16-byte row stride: no bank conflicts
    constexpr int MP_STAGES = MT <= 4 ? 3 : 2;
    __shared__ __align__(16) floatX Hs[MP_STAGES][64 * MP_LD];
    __shared__ __align__(16) floatX Ps[MP_STAGES][64 * PLD];   // phi rows k0..k0+63, [k][col]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t0 = blockIdx.x * 64, nk = nC / 64;
    auto load = [&](int buf, int kc) {
        if (kc < nk) {
            fa_load_tile(Hs[buf], H + (size_t)t0 * nC + kc * 64, BT - t0, nC);
            for (int i = threadIdx.x; i < 64 * MT; i += blockDim.x)
                cp_async16(Ps[buf] + (i / MT) * PLD + (i % MT) * 8, phi + ((size_t)kc * 64 + i / MT) * m + (i % MT) * 8, true);
        }
        cp_async_commit();   // empty groups keep the count uniform
    };
    float acc[MT][4], ss[2] = {0.0f, 0.0f}, sx[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int s = 0; s < MP_STAGES - 1; s++) load(s, s);
    for (int kc = 0; kc < nk; kc++) {
        int buf = kc % MP_STAGES;
        cp_async_wait<MP_STAGES - 2>();
        __syncthreads();   // tile kc landed for every thread; tile kc-1's buffer is free
        load((kc + MP_STAGES - 1) % MP_STAGES, kc + MP_STAGES - 1);
        proj_chunk<MT, PLD, DHC>(acc, ss, sx, Hs[buf] + warp * 16 * MP_LD, Ps[buf], lane);
        if (DHC && (kc + 1) * 64 % C == 0) {   // a stream row is complete (C % 64 == 0): its LayerNorm statistics
#pragma unroll
            for (int h = 0; h < 2; h++) {
#pragma unroll
                for (int o = 1; o <= 2; o <<= 1) {
                    ss[h] += __shfl_xor_sync(0xffffffff, ss[h], o);
                    sx[h] += __shfl_xor_sync(0xffffffff, sx[h], o);
                }
                int t = t0 + warp * 16 + lane / 4 + 8 * h;
                if (t < BT && lane % 4 == 0) {
                    size_t r = (size_t)t * N + kc * 64 / C;
                    float mu = sx[h] / C;
                    rms[r] = mu;
                    rstd[r] = rsqrtf(fmaxf(ss[h] / C - mu * mu, 0.0f) + 1e-5f);
                }
                ss[h] = sx[h] = 0.0f;
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!DHC) {
            ss[h] += __shfl_xor_sync(0xffffffff, ss[h], 1);
            ss[h] += __shfl_xor_sync(0xffffffff, ss[h], 2);
        }
        int t = t0 + warp * 16 + lane / 4 + 8 * h;
        if (t >= BT) continue;
        if (!DHC && lane % 4 == 0) rms[t] = sqrtf(ss[h] / nC + 1e-6f);
#pragma unroll
        for (int j = 0; j < MT; j++)
            *reinterpret_cast<float2 *>(p + (size_t)t * m + j * 8 + 2 * (lane % 4)) = make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
    }
}

// Boundary fusion (issue 5): the post-mix of sublayer k and the x @ phi of sublayer k + 1 (mHC's,
// or dHC's block-diagonal one) in one pass over the streams. A block owns 32 tokens and walks the
// C channels in chunks of 64; per chunk it loads the n stream tiles of H^k, the tile of y and the n
// matching 64-row chunks of phi (cp.async, three stages), forms H^{k+1}_i = post_i y + sum_j
// res_ij H_j in place (the post-mix kernel's arithmetic, so the same bf16 values), stores them, and
// feeds them to the tensor cores as the A operand of the projection; the rms (mhc) or the per-stream
// mean and rstd (dhc) come from the same fragments. Three stages: two chunks in flight per block. Warps 0-1 take streams [0, n/2) of their 16
// tokens, warps 2-3 the rest; their products are added at the end. H^{k+1} is not read back for the
// projection. n = 2, 4 (shared memory). 64-token blocks (1 block per SM) were slower than the two
// kernels apart.
#define PM_TOK 32
#define PM_STAGES 3
template <int N>
struct PmShape {
    static constexpr int m = N * N + 2 * N, MT = m / 8 > 0 ? m / 8 : 1, PLD = 8 * (MT | 1), NC = N * N + N;
    static constexpr int STAGE = (N + 1) * PM_TOK * MP_LD + N * 64 * PLD;   // n H tiles + the y tile, n phi chunks (bf16 elements)
    static constexpr int SMEM = PM_STAGES * STAGE * (int)sizeof(floatX) + PM_TOK * NC * (int)sizeof(float);   // + res and post per token
};
template <int N, bool DHC>
__global__ void __launch_bounds__(128) hc_postmix_proj_kernel(floatX *Hout, float *p, float *rms, float *rstd, const floatX *H,
                                                              const floatX *y, const float *post, const float *res, const floatX *phi,
                                                              int BT, int C) {
    using S = PmShape<N>;
    constexpr int m = S::m, MT = S::MT, PLD = S::PLD, NC = S::NC, NH = N / 2;
    extern __shared__ __align__(16) unsigned char pm_smem[];
    floatX *tiles = reinterpret_cast<floatX *>(pm_smem);
    float *coef = reinterpret_cast<float *>(pm_smem + PM_STAGES * S::STAGE * sizeof(floatX));   // per token: res (row-major), post
    auto Hs = [&](int b, int j) { return tiles + b * S::STAGE + j * PM_TOK * MP_LD; };  // j = N: the y tile
    auto Ps = [&](int b, int i) { return tiles + b * S::STAGE + (N + 1) * PM_TOK * MP_LD + i * 64 * PLD; };
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t0 = blockIdx.x * PM_TOK, nchunk = C / 64, nC = N * C;
    int rw = (warp % 2) * 16, s0 = (warp / 2) * NH;   // this warp's 16 tokens and first stream
    auto load = [&](int b, int cc) {
        if (cc < nchunk) {
#pragma unroll
            for (int j = 0; j < N; j++) fa_load_tile<PM_TOK>(Hs(b, j), H + (size_t)t0 * nC + (size_t)j * C + cc * 64, BT - t0, nC);
            fa_load_tile<PM_TOK>(Hs(b, N), y + (size_t)t0 * C + cc * 64, BT - t0, C);
#pragma unroll
            for (int i = 0; i < N; i++)
                for (int e = threadIdx.x; e < 64 * MT; e += blockDim.x)
                    cp_async16(Ps(b, i) + (e / MT) * PLD + (e % MT) * 8, phi + ((size_t)i * C + cc * 64 + e / MT) * m + (e % MT) * 8, true);
        }
        cp_async_commit();   // empty groups keep the count uniform
    };
    for (int st = 0; st < PM_STAGES - 1; st++) load(st, st);
    for (int e = threadIdx.x; e < PM_TOK * NC; e += blockDim.x) {
        int r = e / NC, q = e % NC, t = t0 + r;
        coef[e] = t >= BT ? 0.0f : q < N * N ? res[(size_t)t * N * N + q] : post[(size_t)t * N + q - N * N];
    }
    float acc[MT][4], ss[NH][2], sx[NH][2];   // squares (and, dhc, sums) per own stream for rows lane/4 and lane/4 + 8
#pragma unroll
    for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < NH; i++) ss[i][0] = ss[i][1] = sx[i][0] = sx[i][1] = 0.0f;
    for (int cc = 0; cc < nchunk; cc++) {
        int b = cc % PM_STAGES;
        cp_async_wait<PM_STAGES - 2>();
        __syncthreads();   // chunk cc landed for every thread; chunk cc - 1's buffer is free
        load((cc + PM_STAGES - 1) % PM_STAGES, cc + PM_STAGES - 1);
        for (int e = threadIdx.x; e < PM_TOK * 8; e += blockDim.x) {   // post-mix, 8 channels of one token per step
            int r = e >> 3, c8 = (e & 7) * 8;
            const float *cf = coef + r * NC;
            x128 hv[N], yv = *reinterpret_cast<const x128 *>(Hs(b, N) + r * MP_LD + c8);
#pragma unroll
            for (int j = 0; j < N; j++) hv[j] = *reinterpret_cast<const x128 *>(Hs(b, j) + r * MP_LD + c8);
#pragma unroll
            for (int i = 0; i < N; i++) {
                x128 o = postmix_chunk<N>(cf, cf[N * N + i], hv, yv, i);
                *reinterpret_cast<x128 *>(Hs(b, i) + r * MP_LD + c8) = o;   // in place: this thread read all of them
                if (t0 + r < BT) store128(Hout + (size_t)(t0 + r) * nC + (size_t)i * C + cc * 64 + c8, o);
            }
        }
        __syncthreads();
#pragma unroll
        for (int si = 0; si < NH; si++) proj_chunk<MT, PLD, DHC>(acc, ss[si], sx[si], Hs(b, s0 + si) + rw * MP_LD, Ps(b, s0 + si), lane);
    }
    __syncthreads();   // the tiles are free: the exchange below reuses them
    // warps 2-3 hand their products (and, mhc, their squares) to warps 0-1 through the free tiles
    float *xch = reinterpret_cast<float *>(pm_smem) + (warp % 2) * 32 * (4 * MT + 2) + lane * (4 * MT + 2);
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < NH; i++)
#pragma unroll
            for (int o = 1; o <= 2; o <<= 1) {
                ss[i][h] += __shfl_xor_sync(0xffffffff, ss[i][h], o);
                if (DHC) sx[i][h] += __shfl_xor_sync(0xffffffff, sx[i][h], o);
            }
    float sq[2] = {0.0f, 0.0f};   // mhc: the squares of this warp's streams
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < NH; i++) sq[h] += ss[i][h];
    if (warp >= 2) {
#pragma unroll
        for (int j = 0; j < MT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) xch[j * 4 + q] = acc[j][q];
        xch[4 * MT] = sq[0];
        xch[4 * MT + 1] = sq[1];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int t = t0 + rw + lane / 4 + 8 * h;
        if (t >= BT) continue;
        if (DHC && lane % 4 == 0)
#pragma unroll
            for (int i = 0; i < NH; i++) {
                float mu = sx[i][h] / C;
                rms[(size_t)t * N + s0 + i] = mu;
                rstd[(size_t)t * N + s0 + i] = rsqrtf(fmaxf(ss[i][h] / C - mu * mu, 0.0f) + 1e-5f);
            }
        if (warp >= 2) continue;
        if (!DHC && lane % 4 == 0) rms[t] = sqrtf((sq[h] + xch[4 * MT + h]) / nC + 1e-6f);
#pragma unroll
        for (int j = 0; j < MT; j++)
            *reinterpret_cast<float2 *>(p + (size_t)t * m + j * 8 + 2 * (lane % 4)) =
                make_float2(acc[j][2 * h] + xch[j * 4 + 2 * h], acc[j][2 * h + 1] + xch[j * 4 + 2 * h + 1]);
    }
}

template <int N, bool DHC>
static void hc_postmix_proj_launch(floatX *Hout, float *p, float *rms, float *rstd, const floatX *H, const floatX *y, const float *post,
                                   const float *res, const floatX *phi, int BT, int C) {
    static bool attr = false;
    if (!attr) {   // over the 48 KB default: opt in once per instantiation
        cudaCheck(cudaFuncSetAttribute(hc_postmix_proj_kernel<N, DHC>, cudaFuncAttributeMaxDynamicSharedMemorySize, PmShape<N>::SMEM));
        attr = true;
    }
    hc_postmix_proj_kernel<N, DHC><<<ceil_div(BT, PM_TOK), 128, PmShape<N>::SMEM>>>(Hout, p, rms, rstd, H, y, post, res, phi, BT, C);
    kernelCheck();
}
static void hc_postmix_proj(int n, bool dhc, floatX *Hout, float *p, float *rms, float *rstd, const floatX *H, const floatX *y,
                            const float *post, const float *res, const floatX *phi, int BT, int C) {
    if (n == 2 && dhc) hc_postmix_proj_launch<2, true>(Hout, p, rms, rstd, H, y, post, res, phi, BT, C);
    else if (n == 4 && dhc) hc_postmix_proj_launch<4, true>(Hout, p, rms, rstd, H, y, post, res, phi, BT, C);
    else if (n == 2) hc_postmix_proj_launch<2, false>(Hout, p, rms, rstd, H, y, post, res, phi, BT, C);
    else if (n == 4) hc_postmix_proj_launch<4, false>(Hout, p, rms, rstd, H, y, post, res, phi, BT, C);
    else die("internal: the fused post-mix + projection kernel takes n = 2 or 4 (n=%d)", n);
}

// row r = (token r / n, stream i = r % n) of dhc's gates from the row's n + 2 products pr (of the
// block-diagonal projection) and its LayerNorm mean mu and rstd rs: x_hat . g_q, the tanh terms
// (ta, tb and xg kept for the backward), pre_i, post_i and column i of res; returns pre_i (shared by
// dhc_coeffs_proj_kernel and the forward boundary kernel)
template <int N>
__device__ __forceinline__ float dhc_gates_row(float *pre, float *post, float *res, float *ta, float *tb, float *xg, const float *pr, float mu,
                                               float rs, const float *gc, const float *A, const float *b, const float *sa, const float *sb,
                                               size_t r) {
    constexpr int n = N, n1 = N + 1, ng = N + 2;
    size_t bt = r / n;
    int i = (int)(r % n);
    float t[ng];
#pragma unroll
    for (int q = 0; q < ng; q++) {
        float x = rs * (pr[q] - mu * gc[q]);
        xg[r * ng + q] = x;
        t[q] = tanhf(x + gc[ng + q]);
    }
#pragma unroll
    for (int q = 0; q < n1; q++) ta[r * n1 + q] = t[q];
    tb[r] = t[n1];
    float pv = A[i * n1] + sa[0] * t[0];
    pre[r] = pv;
    post[r] = b[i] + sb[0] * t[n1];
#pragma unroll
    for (int j = 0; j < n; j++) res[bt * n * n + j * n + i] = A[i * n1 + 1 + j] + sa[0] * t[1 + j];
    return pv;
}

#if !defined(ENABLE_FP32)   // bf16 tensor-core kernels
// phi (nC x m, row-major, one sublayer per blockIdx.y) as the tensor cores' B fragments: entry
// (ks MT + j) 32 + lane holds the two registers lane needs for rows [16 ks, 16 ks + 16) and columns
// [8 j, 8 j + 8), so a warp reads a fragment as one coalesced 256-byte load (from L2) instead of
// staging phi in shared memory. Rebuilt every step (phi changes with each update): 3.5 MB at d12 n=4.
__global__ void phi_frag_kernel(uint2 *out, const floatX *phi, int nC, int m) {
    size_t per = (size_t)nC / 16 * (m / 8) * 32, e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= per) return;
    int lane = (int)(e % 32), j = (int)(e / 32 % (m / 8)), ks = (int)(e / 32 / (m / 8)), col = j * 8 + lane / 4;
    const floatX *P = phi + (size_t)blockIdx.y * nC * m;
    auto pack = [&](int r) {   // rows r and r + 1 of column col, the lower row in the low half
        __nv_bfloat162 v = __halves2bfloat162(P[(size_t)r * m + col], P[(size_t)(r + 1) * m + col]);
        return *reinterpret_cast<uint32_t *>(&v);
    };
    int r0 = ks * 16 + 2 * (lane % 4);
    out[(size_t)blockIdx.y * per + e] = make_uint2(pack(r0), pack(r0 + 8));
}

// Forward boundary on whole rows (issue 5): everything between sublayer k's output y and sublayer
// k + 1's GEMMs in one kernel. A block owns FB_TOK tokens and keeps their n C-wide rows of H^{k+1} in
// shared memory, so the pre-mix reads them from there: the post-mix + projection kernel followed by
// the pre-mix + LayerNorm kernel read H^{k+1} back from HBM (100 MB per d12 sublayer at n = 4; session
// 7's version of this fusion read it back through L2 and missed). Phases, between block barriers:
//   1. H^{k+1}_i = post_i y + sum_j res_ij H^k_j (postmix_chunk: the bits of every kernel that forms
//      it), to HBM and to the block's rows; per (token, stream) sums and squares of the rounded
//      values (mHC's rms, dHC's per-stream LayerNorm statistics)
//   2. p = vec(H^{k+1}) @ phi on the tensor cores, A from the rows, B fragments from phif (L2); warp w
//      takes the w-th eighth of the nC products, the eight partial products summed in warp order
//   3. sublayer k + 1's gates (mhc_gates_row / dhc_gates_row); mHC's Sinkhorn-Knopp stays on the
//      coefficient stream, reading z
//   4. u = sum_i pre_i H^{k+1}_i and the sublayer's LayerNorm, a warp per token (premix_ln_row)
// H^{k+1} is bit-identical to the kernels apart; p is summed in another order, so pre and what
// follows from it agree with them to rounding.
// 16 tokens and 8 warps a block, two blocks per SM (16 threads per token in the post-mix, two
// tokens per warp in the pre-mix); each thread holds FB_YV chunks of y: C <= 16 FB_YV X128 = 768.
// Measured against it (bench_hc, C = 768): 8 tokens and 4 warps a block, four blocks per SM, 166 us
// vs 141 (twice the phi fragments read per token, the products' rows half empty); persistent blocks
// requesting the next group's rows during the LayerNorm, 160 us (register spills)
#define FB_TOK 16
#define FB_WARPS 8
#define FB_YV 6
struct FbArgs {
    floatX *Hout;                       // H^{k+1}
    const floatX *H, *y;                // H^k, sublayer k's output
    const float *post, *res;            // sublayer k's
    const uint2 *phif;                  // sublayer k + 1's phi as fragments (phi_frag_kernel)
    float *pre, *post1, *res1, *z;      // sublayer k + 1's gates (res1: dhc only) and z (mhc) / xg (dhc)
    float *st0, *st1;                   // mhc: rms (st1 unused); dhc: the per-stream mean and rstd
    const float *bias, *alpha;          // mhc's gate parameters
    float *ta, *tb;                     // dhc's tanh terms
    const float *gc, *A, *b, *sa, *sb;  // dhc's gate parameters
    floatX *u, *ln;                     // sublayer k + 1's input (NULL: not stored) and its LayerNorm
    float *ln_mean, *ln_rstd;
    const floatX *lnw, *lnb;
    int BT, C;
};
// shared memory: the rows (FB_TOK x (nC + 8) bf16; the 16-byte pad keeps ldmatrix free of bank
// conflicts), the warps' partial products (FB_WARPS x FB_TOK x m), res/post, pre and the statistics
static size_t fb_smem(int n, int C) {
    int m = n * n + 2 * n;
    return (size_t)FB_TOK * (n * C + 8) * sizeof(floatX) + ((size_t)FB_WARPS * FB_TOK * m + (size_t)FB_TOK * (n * n + n + n * 3)) * sizeof(float);
}
// B fragments of k-steps [ks, ks + FB_KB) below k1 (zeros past it)
#define FB_KB 4
template <int MT>
__device__ __forceinline__ void fb_load_b(uint2 (&bf)[FB_KB][MT], const uint2 *phif, int ks, int k1, int lane) {
#pragma unroll
    for (int u = 0; u < FB_KB; u++)
#pragma unroll
        for (int j = 0; j < MT; j++) bf[u][j] = ks + u < k1 ? __ldg(phif + ((size_t)(ks + u) * MT + j) * 32 + lane) : make_uint2(0, 0);
}

template <int N, bool DHC>
__global__ void __launch_bounds__(32 * FB_WARPS, 2) hc_fwd_boundary_kernel(const FbArgs g) {
    constexpr int m = N * N + 2 * N, MT = m / 8, NC = N * N + N, TB = FB_TOK, W = FB_WARPS, TPT = 32 * W / TB, YV = FB_YV;
    extern __shared__ __align__(16) unsigned char fb_smem_raw[];
    const int C = g.C, nC = N * C, RLD = nC + 8, BT = g.BT;
    floatX *rows = reinterpret_cast<floatX *>(fb_smem_raw);
    float *xch = reinterpret_cast<float *>(fb_smem_raw + (size_t)TB * RLD * sizeof(floatX));   // [warp][TB][m]
    float *coef = xch + W * TB * m;   // [TB][NC]: res (row-major) and post of sublayer k
    float *pre_s = coef + TB * NC;           // [TB][N]
    float *st = pre_s + TB * N;              // [TB][N][2]: sum, sum of squares of H^{k+1}_i
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t0 = blockIdx.x * TB;
    {   // 1. the post-mix. Every H^k row of the block and its res/post are requested at once (cp.async,
        // zeros past BT) and y into registers, so one wait covers all of the block's reads (res/post were
        // plain loads waited on before y was requested: a tenth of the stall samples); then in place,
        // TPT consecutive threads per token, each a chunk of every stream at a time
        for (int e = threadIdx.x; e < TB * NC; e += blockDim.x) {   // res and post of sublayer k
            int r = e / NC, q = e % NC;
            bool in = t0 + r < BT;
            cp_async4(coef + e, !in ? g.post : q < N * N ? g.res + (size_t)(t0 + r) * N * N + q : g.post + (size_t)(t0 + r) * N + q - N * N, in);
        }
        {   // chunk e = r8 nc8 + c8 of the block's rows (contiguous in H), (r8, c8) stepped rather than divided
            const int nc8 = nC / X128;
            const floatX *src = g.H + (size_t)t0 * nC;
            for (int e = threadIdx.x, r8 = e / nc8, c8 = e % nc8; e < TB * nc8; e += blockDim.x) {
                bool in = t0 + r8 < BT;
                cp_async16(rows + (size_t)r8 * RLD + c8 * X128, in ? src + (size_t)e * X128 : g.H, in);
                for (c8 += blockDim.x; c8 >= nc8; c8 -= nc8) r8++;
            }
        }
        cp_async_commit();
        int r = threadIdx.x / TPT, sub = threadIdx.x % TPT, t = t0 + r, C8 = C / X128;
        bool ok = t < BT;
        x128 yv[YV];
#pragma unroll
        for (int j = 0; j < YV; j++) {
            int c8 = sub + j * TPT;
            yv[j] = ok && c8 < C8 ? load128(g.y + (size_t)t * C + c8 * X128) : x128{};
        }
        cp_async_wait<0>();
        __syncthreads();
        const float *cf = coef + r * NC;
        floatX *row = rows + (size_t)r * RLD;
        float s[N], q[N];
#pragma unroll
        for (int i = 0; i < N; i++) s[i] = q[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < YV; j++) {
            int c = (sub + j * TPT) * X128;
            if (c >= C) break;
            x128 hv[N];
#pragma unroll
            for (int i = 0; i < N; i++) hv[i] = load128(row + i * C + c);
#pragma unroll
            for (int i = 0; i < N; i++) {
                x128 o = postmix_chunk<N>(cf, cf[N * N + i], hv, yv[j], i);
                store128(row + i * C + c, o);   // in place: this thread read every stream of the chunk
                if (ok) store128(g.Hout + (size_t)t * nC + (size_t)i * C + c, o);
#pragma unroll
                for (int e = 0; e < X128; e++) { float x = tof(o.v[e]); s[i] += x; q[i] += x * x; }
            }
        }
#pragma unroll
        for (int i = 0; i < N; i++)
#pragma unroll
            for (int o = TPT / 2; o >= 1; o >>= 1) {
                s[i] += __shfl_xor_sync(0xffffffff, s[i], o);
                q[i] += __shfl_xor_sync(0xffffffff, q[i], o);
            }
        if (sub == 0)
#pragma unroll
            for (int i = 0; i < N; i++) { st[(r * N + i) * 2] = s[i]; st[(r * N + i) * 2 + 1] = q[i]; }
    }
    __syncthreads();
    {   // 2. the projection: rows lane/4 and lane/4 + 8 of the fragments. The B fragments come in
        // batches of FB_KB k-steps, each batch requested before the previous one is used (requesting
        // the first during phase 1 spilled registers: 166 vs 141 us)
        int k0 = warp * (nC / 16) / W, k1 = (warp + 1) * (nC / 16) / W;   // this warp's k-steps
        uint2 bfa[FB_KB][MT], bfb[FB_KB][MT];
        float acc[MT][4];
#pragma unroll
        for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        const floatX *arow = rows + (size_t)(lane % 16) * RLD + (lane / 16) * 8;
        auto mma_batch = [&](const uint2 (&bf)[FB_KB][MT], int ks) {
#pragma unroll
            for (int u = 0; u < FB_KB; u++) {
                if (ks + u >= k1) break;
                uint32_t a[4];
                ldsm_x4(a, arow + (ks + u) * 16);
#pragma unroll
                for (int j = 0; j < MT; j++) mma_bf16(acc[j], a, bf[u][j].x, bf[u][j].y);
            }
        };
        fb_load_b<MT>(bfa, g.phif, k0, k1, lane);
        for (int ks = k0; ks < k1; ks += 2 * FB_KB) {
            fb_load_b<MT>(bfb, g.phif, ks + FB_KB, k1, lane);
            mma_batch(bfa, ks);
            fb_load_b<MT>(bfa, g.phif, ks + 2 * FB_KB, k1, lane);
            mma_batch(bfb, ks + FB_KB);
        }
        float *xw = xch + warp * TB * m;
#pragma unroll
        for (int j = 0; j < MT; j++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                *reinterpret_cast<float2 *>(xw + (lane / 4 + 8 * h) * m + j * 8 + 2 * (lane % 4)) = make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TB * m; e += blockDim.x) {   // p into warp 0's slot: each element read and written by one thread
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < W; w++) v += xch[w * TB * m + e];
        xch[e] = v;
    }
    __syncthreads();
    if (threadIdx.x < TB * N) {   // 3. the gates, a thread per (token, stream)
        int r = threadIdx.x / N, i = threadIdx.x % N;
        size_t t = (size_t)t0 + r;
        if (t < (size_t)BT) {
            const float *pp = xch + r * m, *sr = st + r * N * 2;
            float pv;
            if (DHC) {
                float mu = sr[2 * i] / C, rs = rsqrtf(fmaxf(sr[2 * i + 1] / C - mu * mu, 0.0f) + 1e-5f);
                g.st0[t * N + i] = mu;
                g.st1[t * N + i] = rs;
                pv = dhc_gates_row<N>(g.pre, g.post1, g.res1, g.ta, g.tb, g.z, pp + i * (N + 2), mu, rs, g.gc, g.A, g.b, g.sa, g.sb, t * N + i);
            } else {
                float sq = 0.0f;
#pragma unroll
                for (int j = 0; j < N; j++) sq += sr[2 * j + 1];
                float rr = sqrtf(sq / nC + 1e-6f);
                if (i == 0) g.st0[t] = rr;
                pv = mhc_gates_row<N>(g.pre, g.post1, g.z + t * m, pp, rr, g.bias, g.alpha, t, i);
            }
            pre_s[r * N + i] = pv;
        }
    }
    __syncthreads();
    for (int r = warp; r < TB; r += W) {   // 4. the pre-mix and the LayerNorm from the rows
        size_t t = (size_t)t0 + r;
        if (t >= (size_t)BT) break;
        float p[N];
#pragma unroll
        for (int i = 0; i < N; i++) p[i] = pre_s[r * N + i];
        premix_ln_row<N>(g.u ? g.u + t * C : NULL, g.ln + t * C, g.ln_mean + t, g.ln_rstd + t, rows + (size_t)r * RLD, p, g.lnw, g.lnb, C, lane);
    }
}

// the whole-row kernel where it applies: n = 2, 4, C <= 16 FB_YV X128 and two blocks on an SM (768
// at n = 4 on an H100); elsewhere the kernels apart. g_fwd_boundary = 0 (tests, or
// GPT_HC_FUSE_FORWARD=0) keeps them apart
static int g_fwd_boundary = -1;
static int fb_fits(int n, int C) {
    if (g_fwd_boundary < 0) g_fwd_boundary = !(getenv("GPT_HC_FUSE_FORWARD") && atoi(getenv("GPT_HC_FUSE_FORWARD")) == 0);
    static int smsm = 0;
    if (smsm == 0) {
        int dev;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&smsm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    }
    return g_fwd_boundary && (n == 2 || n == 4) && C <= 16 * FB_YV * X128 && 2 * (fb_smem(n, C) + 1024) <= (size_t)smsm;
}
template <int N, bool DHC>
static void hc_fwd_boundary_launch(const FbArgs &g) {
    static int attr = 0;   // the largest size this instantiation has opted in to
    int smem = (int)fb_smem(N, g.C);
    if (smem > attr) {
        cudaCheck(cudaFuncSetAttribute(hc_fwd_boundary_kernel<N, DHC>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        attr = smem;
    }
    hc_fwd_boundary_kernel<N, DHC><<<ceil_div(g.BT, FB_TOK), 32 * FB_WARPS, smem>>>(g);
    kernelCheck();
}
static void hc_fwd_boundary(int n, bool dhc, const FbArgs &g) {
    if (n == 2 && dhc) hc_fwd_boundary_launch<2, true>(g);
    else if (n == 4 && dhc) hc_fwd_boundary_launch<4, true>(g);
    else if (n == 2) hc_fwd_boundary_launch<2, false>(g);
    else if (n == 4) hc_fwd_boundary_launch<4, false>(g);
    else die("internal: the forward boundary kernel takes n = 2 or 4 (n=%d)", n);
}
#endif

// The backward's pass over dH, one kernel (version 3; versions 1 and 2 are in dev/cuda/bench_hc.cu):
//   dH += pre_i du + dp @ phi^T + kx H (+ k0 for dhc)   (the pre-mix, projection and rms terms)
//   Mpart[g] = H^T dp over this block's tokens          (the phi gradient, by the same tiles of H)
// grid (G token groups, nC / 64 channel tiles), 128 threads: a block keeps its 64-channel phi tile
// and loops over the 64-token tiles of its group, prefetching the next tile (H, dH, du, dp) with
// cp.async while it computes the current one. Each warp owns 16 tokens of the dH product and 16
// channels of the H^T dp product (H^T through ldmatrix.trans). Mpart is summed over the groups by
// mhc_dphi_reduce_kernel in a fixed order. Version 2 (one tile per block, no prefetch, cuBLAS for
// H^T dp) took 162 + 42 us per d12 sublayer at n = 4.
// DHC: dhc's LayerNorm backward through the block-diagonal phi; kx and k0 are per (token, stream).
#define DH_GROUPS 16
// a phi tile's row r holds MK values as MK / 8 16-byte chunks; dense (rows of MK), chunk c sits at
// c ^ phi_swz(r), so that the 8 rows of an ldmatrix fall in distinct bank groups (MK = 16, 32)
template <int MK>
__device__ __forceinline__ int phi_swz(int r) { return (r / (MK >= 64 ? 1 : 64 / MK)) % (MK / 8); }
// acc = dp (this warp's 16 tokens x MK, rows of KLD) @ phi^T (MK x 64 channels, phi rows [channel][k]:
// rows of KLD, or with PSWZ dense and swizzled)
template <int MK, int KLD, bool PSWZ = false>
__device__ __forceinline__ void dp_phiT_tile(float (&acc)[8][4], const floatX *ds, const floatX *Ps, int warp, int lane) {
#pragma unroll
    for (int jj = 0; jj < 8; jj++) acc[jj][0] = acc[jj][1] = acc[jj][2] = acc[jj][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < MK / 16; kk++) {
        uint32_t a[4];
        ldsm_x4(a, ds + (warp * 16 + lane % 16) * KLD + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            uint32_t bb[4];
            int r = (lane % 8) + (lane / 16) * 8 + jp * 16, ch = kk * 2 + (lane / 8) % 2;
            ldsm_x4(bb, PSWZ ? Ps + r * MK + (ch ^ phi_swz<MK>(r)) * 8 : Ps + r * KLD + ch * 8);
            mma_bf16(acc[2 * jp], a, bb[0], bb[1]);
            mma_bf16(acc[2 * jp + 1], a, bb[2], bb[3]);
        }
    }
}
template <int N>
struct DhShape {
    static constexpr int m = N * N + 2 * N, MC = m / 8 > 0 ? m / 8 : 1, MK = (m + 15) / 16 * 16, KLD = MK + 8;
    static constexpr int STAGE = 3 * 64 * MP_LD + 64 * KLD;                  // H, dH, du, dp tiles (bf16 elements)
    static constexpr int SMEM = (64 * KLD + 2 * STAGE) * (int)sizeof(floatX);  // phi tile + two stages
};

// dH tile (in shared memory, rows of MP_LD) += acc + kx H + k0 + pre_i du for this warp's 16 tokens
// (k0 only for dhc, kx and k0 per (token, stream) row there, per token for mhc). kx, k0, pre start at
// the tile's first token (in global or shared memory: the same layout); rows from `live` on are past BT
template <int N, bool DHC>
__device__ __forceinline__ void dh_tile_epilogue(floatX *dhs, const floatX *hs, const floatX *us, const float (&acc)[8][4],
                                                 const float *kx, const float *k0, const float *pre, int live, int stream,
                                                 int warp, int lane) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = warp * 16 + lane / 4 + 8 * h;
        bool ok = r < live;
        int kr = DHC ? r * N + stream : r;
        float k = ok ? kx[kr] : 0.0f, kc0 = DHC && ok ? k0[kr] : 0.0f, pr = ok ? pre[r * N + stream] : 0.0f;
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            int col = jj * 8 + 2 * (lane % 4);
            __nv_bfloat162 hv = *reinterpret_cast<const __nv_bfloat162 *>(hs + r * MP_LD + col);
            __nv_bfloat162 uv = *reinterpret_cast<const __nv_bfloat162 *>(us + r * MP_LD + col);
            __nv_bfloat162 *dv = reinterpret_cast<__nv_bfloat162 *>(dhs + r * MP_LD + col);
            float d0 = __low2float(*dv) + acc[jj][2 * h] + k * __low2float(hv) + kc0 + pr * __low2float(uv);
            float d1 = __high2float(*dv) + acc[jj][2 * h + 1] + k * __high2float(hv) + kc0 + pr * __high2float(uv);
            *dv = __floats2bfloat162_rn(d0, d1);
        }
    }
}

template <int N, bool DHC>
__global__ void __launch_bounds__(128) mhc_dh_kernel(floatX *dH, float *Mpart, const floatX *H, const floatX *dp, const float *kx,
                                                     const float *k0, const floatX *phi, const floatX *du, const float *pre, int BT, int C,
                                                     int tiles_per_group) {
    using S = DhShape<N>;
    constexpr int m = S::m, MC = S::MC, MK = S::MK, KLD = S::KLD, MT = MC;   // launched for m % 8 == 0
    extern __shared__ __align__(16) unsigned char dh_smem[];
    floatX *Ps = reinterpret_cast<floatX *>(dh_smem);   // phi rows of this channel tile, [channel][k]
    int nC = N * C, stream = blockIdx.y * 64 / C, cu = blockIdx.y * 64 % C, c0 = blockIdx.y * 64;   // C % 64 == 0
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int tile0 = blockIdx.x * tiles_per_group, ntile = min(tiles_per_group, (BT + 63) / 64 - tile0);
    auto Hs = [&](int b) { return Ps + 64 * KLD + b * S::STAGE; };
    auto dHs = [&](int b) { return Hs(b) + 64 * MP_LD; };
    auto Us = [&](int b) { return Hs(b) + 2 * 64 * MP_LD; };
    auto Ds = [&](int b) { return Hs(b) + 3 * 64 * MP_LD; };
    for (int i = threadIdx.x; i < 64 * MC; i += blockDim.x)
        cp_async16(Ps + (i / MC) * KLD + (i % MC) * 8, phi + (size_t)(c0 + i / MC) * m + (i % MC) * 8, true);
    if (MK > m)   // zero k-padding of the phi and dp tiles (cp.async never writes it)
        for (int r = threadIdx.x; r < 64; r += blockDim.x) {
            *reinterpret_cast<int4 *>(Ps + r * KLD + m) = make_int4(0, 0, 0, 0);
            *reinterpret_cast<int4 *>(Ds(0) + r * KLD + m) = make_int4(0, 0, 0, 0);
            *reinterpret_cast<int4 *>(Ds(1) + r * KLD + m) = make_int4(0, 0, 0, 0);
        }
    auto load = [&](int b, int j) {
        int t0 = (tile0 + j) * 64;
        fa_load_tile(Hs(b), H + (size_t)t0 * nC + c0, BT - t0, nC);
        fa_load_tile(dHs(b), dH + (size_t)t0 * nC + c0, BT - t0, nC);
        fa_load_tile(Us(b), du + (size_t)t0 * C + cu, BT - t0, C);
        for (int i = threadIdx.x; i < 64 * MC; i += blockDim.x) {
            int r = i / MC, q = (i % MC) * 8;
            bool ok = t0 + r < BT;
            cp_async16(Ds(b) + r * KLD + q, dp + (ok ? (size_t)(t0 + r) * m + q : 0), ok);
        }
    };
    load(0, 0);
    cp_async_commit();
    float macc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; j++) macc[j][0] = macc[j][1] = macc[j][2] = macc[j][3] = 0.0f;
    for (int j = 0; j < ntile; j++) {
        int b = j & 1, t0 = (tile0 + j) * 64;
        if (j + 1 < ntile) load(b ^ 1, j + 1);   // that buffer's stores finished before the last barrier
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const floatX *hs = Hs(b), *ds = Ds(b), *us = Us(b);
        floatX *dhs = dHs(b);
        float acc[8][4];
        dp_phiT_tile<MK, KLD>(acc, ds, Ps, warp, lane);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {   // H^T (16 channels x 64 tokens) @ dp (64 tokens x m)
            uint32_t a[4];
            int mat = lane / 8;
            ldsm_x4_t(a, hs + (kk * 16 + lane % 8 + (mat / 2) * 8) * MP_LD + warp * 16 + (mat % 2) * 8);
#pragma unroll
            for (int jt = 0; jt < MT; jt++) {
                uint32_t bb[2];
                ldsm_x2_t(bb, ds + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * KLD + jt * 8);
                mma_bf16(macc[jt], a, bb[0], bb[1]);
            }
        }
        dh_tile_epilogue<N, DHC>(dhs, hs, us, acc, kx + (size_t)t0 * (DHC ? N : 1), DHC ? k0 + (size_t)t0 * N : NULL, pre + (size_t)t0 * N,
                                 BT - t0, stream, warp, lane);
        __syncthreads();
        for (int i = threadIdx.x; i < 64 * 8; i += blockDim.x) {   // 16-byte coalesced stores of the tile
            int r = i >> 3, c = (i & 7) * 8;
            if (t0 + r < BT) store128(dH + (size_t)(t0 + r) * nC + c0 + c, *reinterpret_cast<const x128 *>(dhs + r * MP_LD + c));
        }
        __syncthreads();
    }
    float *mp = Mpart + (size_t)blockIdx.x * nC * m;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int c = c0 + warp * 16 + lane / 4 + 8 * h;
#pragma unroll
        for (int jt = 0; jt < MT; jt++)
            *reinterpret_cast<float2 *>(mp + (size_t)c * m + jt * 8 + 2 * (lane % 4)) = make_float2(macc[jt][2 * h], macc[jt][2 * h + 1]);
    }
}

// out (+)= sum over the G groups of Mpart, in group order
__global__ void mhc_dphi_reduce_kernel(float *out, const float *Mpart, int G, size_t count, int accumulate) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= count) return;
    float s = 0.0f;
    for (int g = 0; g < G; g++) s += Mpart[(size_t)g * count + e];
    out[e] = accumulate ? out[e] + s : s;
}

template <int N, bool DHC>
static void mhc_dh_launch(floatX *dH, float *dphi, int accumulate, const floatX *H, const floatX *dp, const float *kx, const float *k0,
                          const floatX *phi, const floatX *du, const float *pre, int BT, int C) {
    static bool attr = false;
    if (!attr) {   // over the 48 KB default: opt in once per instantiation
        cudaCheck(cudaFuncSetAttribute(mhc_dh_kernel<N, DHC>, cudaFuncAttributeMaxDynamicSharedMemorySize, DhShape<N>::SMEM));
        attr = true;
    }
    int m = DhShape<N>::m, tiles = ceil_div(BT, 64), tpg = ceil_div(tiles, DH_GROUPS), G = ceil_div(tiles, tpg);
    size_t count = (size_t)N * C * m;
    float *Mpart = (float *)dscratch(3, (size_t)G * count * sizeof(float));
    mhc_dh_kernel<N, DHC><<<dim3(G, N * C / 64), 128, DhShape<N>::SMEM>>>(dH, Mpart, H, dp, kx, k0, phi, du, pre, BT, C, tpg);
    kernelCheck();
    mhc_dphi_reduce_kernel<<<ceil_div(count, 256), 256>>>(dphi, Mpart, G, count, accumulate);
    kernelCheck();
}

// dispatch on n (even: m % 8 == 0)
template <bool DHC>
static void mhc_dh(int n, floatX *dH, float *dphi, int accumulate, const floatX *H, const floatX *dp, const float *kx, const float *k0,
                   const floatX *phi, const floatX *du, const float *pre, int BT, int C) {
    switch (n) {
        case 2: mhc_dh_launch<2, DHC>(dH, dphi, accumulate, H, dp, kx, k0, phi, du, pre, BT, C); break;
        case 4: mhc_dh_launch<4, DHC>(dH, dphi, accumulate, H, dp, kx, k0, phi, du, pre, BT, C); break;
        case 6: mhc_dh_launch<6, DHC>(dH, dphi, accumulate, H, dp, kx, k0, phi, du, pre, BT, C); break;
        case 8: mhc_dh_launch<8, DHC>(dH, dphi, accumulate, H, dp, kx, k0, phi, du, pre, BT, C); break;
        default: die("internal: the fused mhc/dhc backward needs an even n (n=%d)", n);
    }
}

// Backward boundary fusion (issue 5): sublayer k's dH pass (as mhc_dh_kernel: dH^k = dH^k +
// pre_i du + dp @ phi^T + kx H (+ k0), Mpart = H^T dp) and sublayer k - 1's post-mix backward in
// one kernel. The finished dH^k never goes to memory: the block keeps its tile on chip and forms
// from it dy^{k-1} = sum_i post_i dH^k_i, sublayer k - 1's first dH term res^T dH^k, and the
// per-token sums dpost_i = dH^k_i . y, dres_ij = dH^k_i . H^{k-1}_j over its 64 channels (tensor
// cores; summed over the channel ranges by hc_dpost_reduce_kernel). H^k itself is not read: the
// block forms it from H^{k-1} and y^{k-1}, which the post-mix backward reads anyway, by the
// forward's post-mix (postmix_chunk: the same bits as the stored H^k), 100 MB less per d12
// sublayer at n = 4. A block owns 64 channels of every stream, so the mixing over streams stays in
// the block; it walks the tiles of its token group (TT = 64 / n tokens each, one warp per (stream,
// 16 tokens) for the products) with two cp.async stages of all it reads, three blocks per SM.
// Versions 1 (mhc_dh + hc_postmix_backward_kernel) and 2 (H^k read) are in dev/cuda/bench_hc.cu.
// n = 2, 4 (shared memory).
// The backward boundary kernel's pieces that bench_hc's version 2 shares (the same bits by
// construction). The 16-byte chunks of row r of H^{k-1}_j (j = N: y^{k-1}) in a dense 64-channel tile
// sit XOR-swizzled, so that the 8 rows of one ldmatrix ((token, stream) pairs, or tokens for y) fall
// in distinct bank groups.
template <int N>
__device__ __forceinline__ int bd_pv_swz(int chunk, int r, int j) { return chunk ^ ((j < N ? r * N + j : r) & 7); }
// per-token sums over the block's 64 channels, dres_ij = dH^k_i . H^{k-1}_j and dpost_i = dH^k_i . y,
// into part (range blockIdx.y): warp w takes tokens [w TG, w TG + TG) (TG = 16 / n), A = their dH^k
// rows (row i TG + l: stream i of token l; stream i's tile at dh0 + i tile_ld, rows of MP_LD), B =
// their H^{k-1} rows (column l' n + j, two n-tiles) and y rows (column l', one n-tile; the n + 1
// dense swizzled tiles from pv0, TT x 64 each); only entries with l = l' are kept
template <int N>
__device__ __forceinline__ void bd_token_sums(float *part, const floatX *dh0, int tile_ld, const floatX *pv0, int t0, int BT, int warp, int lane) {
    constexpr int TG = 16 / N, TT = 64 / N, NP = N + N * N;
    float sc[3][4];
#pragma unroll
    for (int nt = 0; nt < 3; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
    int tb = warp * TG, q8 = lane / 8, ar = (q8 % 2) * 8 + lane % 8;   // this lane's A row for ldmatrix
    const floatX *arow = dh0 + (ar / TG) * tile_ld + (tb + ar % TG) * MP_LD + (q8 / 2) * 8;
    int bn = lane % 8, bk = (lane / 8) % 2;   // this lane's B column and k half for ldmatrix (x2)
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        uint32_t a[4];
        ldsm_x4(a, arow + ks * 16);
#pragma unroll
        for (int nt = 0; nt < 3; nt++) {
            int col = nt * 8 + bn, jv = nt < 2 ? col % N : N, rb = tb + (nt < 2 ? col / N : bn % TG);
            uint32_t bf[2];
            ldsm_x2(bf, pv0 + jv * TT * 64 + rb * 64 + bd_pv_swz<N>(ks * 2 + bk, rb, jv) * 8);
            mma_bf16(sc[nt], a, bf[0], bf[1]);
        }
    }
#pragma unroll
    for (int nt = 0; nt < 3; nt++)
#pragma unroll
        for (int v = 0; v < 4; v++) {
            int row = lane / 4 + 8 * (v / 2), col = nt * 8 + 2 * (lane % 4) + v % 2;
            int i = row / TG, l = row % TG, l2 = nt < 2 ? col / N : col - 16, t = t0 + tb + l;
            if (l2 != l || t >= BT) continue;
            int q = nt < 2 ? N + i * N + col % N : i;
            part[((size_t)blockIdx.y * BT + t) * NP + q] = sc[nt][v];
        }
}
// this warp's share of H^T dp (stream s, 4 tiles of 16 channels x m): group (blockIdx.x, token half)
// of Mpart; warps of one stream (n = 2) write separate groups
template <int N, int m, int MT>
__device__ __forceinline__ void bd_store_mpart(float *Mpart, const float (&macc)[4][MT][4], int s, int C, int c0, int warp, int lane) {
    float *mp = Mpart + ((size_t)blockIdx.x * (4 / N) + warp / N) * N * C * m;
#pragma unroll
    for (int ct = 0; ct < 4; ct++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            size_t row = (size_t)s * C + c0 + ct * 16 + lane / 4 + 8 * h;
#pragma unroll
            for (int jt = 0; jt < MT; jt++)
                *reinterpret_cast<float2 *>(mp + row * m + jt * 8 + 2 * (lane % 4)) = make_float2(macc[ct][jt][2 * h], macc[ct][jt][2 * h + 1]);
        }
}
template <int N>
struct BdShape {
    static constexpr int m = N * N + 2 * N, MT = m / 8, MK = (m + 15) / 16 * 16, KLD = MK + 8, TT = 64 / N, NP = N + N * N;
    static constexpr int TILE = TT * MP_LD;   // one tile: TT tokens x 64 channels (rows padded)
    // a stage: H^{k-1} per stream and y^{k-1} (dense rows, chunks swizzled: see pv_swz), res and
    // post of sublayer k - 1 (TT NP floats), kx, k0 and pre of sublayer k (TT N floats each; mHC's kx
    // TT), dH^k per stream, du, dp
    static constexpr int PREV = (N + 1) * TT * 64, COEF = 2 * TT * NP, KP = 2 * 3 * TT * N;
    static constexpr int STAGE = PREV + COEF + KP + (N + 1) * TILE + TT * KLD;
    // + the n phi tiles (dense rows of MK, swizzled) and the H^k tiles formed on chip: 72.5 KB at
    // n = 4, three blocks per SM
    static constexpr int SMEM = (N * 64 * MK + 2 * STAGE + N * TILE) * (int)sizeof(floatX);
};
template <int N, bool DHC>
__global__ void __launch_bounds__(128, 3) hc_boundary_backward_kernel(floatX *dHm, floatX *dym, float *part, float *Mpart, const floatX *dH,
                                                                   const floatX *dp, const float *kx, const float *k0, const floatX *phi,
                                                                   const floatX *du, const float *pre, const floatX *Hm, const floatX *ym,
                                                                   const float *postm, const float *resm, int BT, int C, int tiles_per_group) {
    using S = BdShape<N>;
    constexpr int m = S::m, MT = S::MT, MK = S::MK, KLD = S::KLD, TT = S::TT, NP = S::NP;
    extern __shared__ __align__(16) unsigned char bd_smem[];
    floatX *Ps = reinterpret_cast<floatX *>(bd_smem);   // stream s's phi rows c0..c0+63 at Ps + s * 64 * MK, [channel][k]
    int nC = N * C, c0 = blockIdx.y * 64, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int s = warp % N, rw = (warp / N) * 16;   // this warp's stream and first token of the tile
    int tile0 = blockIdx.x * tiles_per_group, ntile = min(tiles_per_group, (BT + TT - 1) / TT - tile0);
    floatX *stage0 = Ps + N * 64 * MK;
    // stage b: Pv(b, j) H^{k-1}_j (j = N: y^{k-1}), cres/cpost, Dh(b, i) dH^k_i (i = N: du), Ds dp
    auto Pv = [&](int b, int j) { return stage0 + b * S::STAGE + j * TT * 64; };
    auto cres = [&](int b) { return reinterpret_cast<float *>(stage0 + b * S::STAGE + S::PREV); };
    auto cpost = [&](int b) { return cres(b) + TT * N * N; };
    auto ckx = [&](int b) { return cres(b) + TT * NP; };
    auto ck0 = [&](int b) { return ckx(b) + TT * N; };
    auto cpre = [&](int b) { return ck0(b) + TT * N; };
    auto Dh = [&](int b, int i) { return stage0 + b * S::STAGE + S::PREV + S::COEF + S::KP + i * S::TILE; };
    auto Ds = [&](int b) { return Dh(b, N + 1); };
    auto Hk = [&](int i) { return stage0 + 2 * S::STAGE + i * S::TILE; };   // H^k, formed per tile
    auto pv_swz = [&](int chunk, int r, int j) { return bd_pv_swz<N>(chunk, r, j); };   // (see bd_pv_swz)
    for (int i = threadIdx.x; i < N * 64 * (MK / 8); i += blockDim.x) {   // phi, zero k-padding
        int r = i / (MK / 8), ch = i % (MK / 8);   // r = stream * 64 + channel
        floatX *dst = Ps + r * MK + (ch ^ phi_swz<MK>(r)) * 8;
        if (ch < MT) cp_async16(dst, phi + ((size_t)(r / 64) * C + c0 + r % 64) * m + ch * 8, true);
        else *reinterpret_cast<int4 *>(dst) = make_int4(0, 0, 0, 0);
    }
    if (MK > m)   // zero k-padding of the dp tiles (cp.async never writes it)
        for (int r = threadIdx.x; r < 2 * TT; r += blockDim.x) *reinterpret_cast<int4 *>(Ds(r / TT) + (r % TT) * KLD + m) = make_int4(0, 0, 0, 0);
    // The tile's rows of H^{k-1} and dH^k: (token r, stream i) is row R = r N + i of 64 channels at
    // Hm / dH + (t0 N + R) C + c0 (a token's rows adjacent). With 128 threads, thread x takes rows
    // R0 + 16 q (R0 = x / 8, q < 4) at chunk x % 8: its stream R0 % N and swizzle R0 & 7 stay fixed,
    // so every address is a per-thread constant plus q strides (the generic index arithmetic was a
    // fifth of the kernel's instructions: ncu source counters)
    constexpr int RQ = 16 / N;   // tokens per step of q
    const int R0 = threadIdx.x / 8, cc = threadIdx.x % 8, r0 = R0 / N;
    const size_t roff = (size_t)R0 * C + c0 + cc * 8;
    const int hoff = r0 * 64 + (cc ^ (R0 & 7)) * 8, doff = r0 * MP_LD + cc * 8;
    auto load = [&](int b, int j) {
        int t0 = (tile0 + j) * TT, live = BT - t0;
        const floatX *hsrc = Hm + (size_t)t0 * nC + roff, *dsrc = dH + (size_t)t0 * nC + roff;
        floatX *hdst = Pv(b, R0 % N) + hoff, *ddst = Dh(b, R0 % N) + doff;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            bool ok = r0 + q * RQ < live;
            cp_async16(hdst + q * RQ * 64, ok ? hsrc + (size_t)q * 16 * C : ym, ok);
            cp_async16(ddst + q * RQ * MP_LD, ok ? dsrc + (size_t)q * 16 * C : ym, ok);
        }
#pragma unroll
        for (int q = 0; q < TT / 16; q++) {   // y^{k-1} and du: TT token rows
            int r = R0 + 16 * q;
            bool ok = r < live;
            size_t o = (size_t)(t0 + r) * C + c0 + cc * 8;
            cp_async16(Pv(b, N) + r * 64 + pv_swz(cc, r, N) * 8, ok ? ym + o : ym, ok);
            cp_async16(Dh(b, N) + r * MP_LD + cc * 8, ok ? du + o : ym, ok);
        }
        for (int e = threadIdx.x; e < TT * N; e += blockDim.x) {   // post, pre (and dHC's kx, k0): per (token, stream),
            bool ok = e < live * N;                                  // n floats a token: not 16-byte aligned at odd BT
            size_t o = ok ? (size_t)t0 * N + e : 0;
            cp_async4(cpost(b) + e, postm + o, ok);
            cp_async4(cpre(b) + e, pre + o, ok);
            if (DHC) {
                cp_async4(ckx(b) + e, kx + o, ok);
                cp_async4(ck0(b) + e, k0 + o, ok);
            }
        }
        if (!DHC)   // mHC's kx: per token
            for (int e = threadIdx.x; e < TT; e += blockDim.x) cp_async4(ckx(b) + e, kx + (e < live ? t0 + e : 0), e < live);
        for (int q = threadIdx.x; q < TT * N * N / 4; q += blockDim.x) {   // res rows in 16-byte pieces (n^2 floats a token)
            int g = q * 4, bytes = max(0, min(4, live * N * N - g)) * 4;
            cp_async16_n(cres(b) + g, bytes > 0 ? resm + (size_t)t0 * N * N + g : resm, bytes);
        }
        for (int i = threadIdx.x; i < TT * MT; i += blockDim.x) {
            int r = i / MT, q = (i % MT) * 8;
            bool ok = t0 + r < BT;
            cp_async16(Ds(b) + r * KLD + q, dp + (ok ? (size_t)(t0 + r) * m + q : 0), ok);
        }
    };
    load(0, 0);
    cp_async_commit();
    float macc[4][MT][4];   // H^T dp for this warp's stream: 4 tiles of 16 channels x m
#pragma unroll
    for (int ct = 0; ct < 4; ct++)
#pragma unroll
        for (int j = 0; j < MT; j++) macc[ct][j][0] = macc[ct][j][1] = macc[ct][j][2] = macc[ct][j][3] = 0.0f;
    for (int j = 0; j < ntile; j++) {
        int b = j & 1, t0 = (tile0 + j) * TT;
        if (j + 1 < ntile) load(b ^ 1, j + 1);
        cp_async_commit();
        cp_async_wait<1>();   // tile j's stage
        __syncthreads();
        // H^k = post y + res H^{k-1} of sublayer k - 1 (zero past BT: the loads zero-filled), 8
        // channels of one token per thread and step (each warp forming only what its own products
        // read, with __syncwarp, measured no faster: 196.9 vs 193.8 us)
        for (int e = threadIdx.x; e < TT * 8; e += blockDim.x) {
            int r = e >> 3, ch = e & 7;
            const float *cf = cres(b) + r * N * N, *pp = cpost(b) + r * N;
            x128 hv[N], yv = *reinterpret_cast<const x128 *>(Pv(b, N) + r * 64 + pv_swz(ch, r, N) * 8);
#pragma unroll
            for (int i = 0; i < N; i++) hv[i] = *reinterpret_cast<const x128 *>(Pv(b, i) + r * 64 + pv_swz(ch, r, i) * 8);
#pragma unroll
            for (int i = 0; i < N; i++) *reinterpret_cast<x128 *>(Hk(i) + r * MP_LD + ch * 8) = postmix_chunk<N>(cf, pp[i], hv, yv, i);
        }
        __syncthreads();
        const floatX *hs = Hk(s), *ds = Ds(b);
        float acc[8][4];
        dp_phiT_tile<MK, KLD, true>(acc, ds + rw * KLD, Ps + s * 64 * MK, 0, lane);
        uint32_t bb[MT][2];   // dp rows of this warp's 16 tokens as the B operand of H^T dp
#pragma unroll
        for (int jt = 0; jt < MT; jt++) ldsm_x2_t(bb[jt], ds + (rw + (lane % 8) + ((lane / 8) % 2) * 8) * KLD + jt * 8);
#pragma unroll
        for (int ct = 0; ct < 4; ct++) {
            uint32_t a[4];
            int mat = lane / 8;
            ldsm_x4_t(a, hs + (rw + lane % 8 + (mat / 2) * 8) * MP_LD + ct * 16 + (mat % 2) * 8);
#pragma unroll
            for (int jt = 0; jt < MT; jt++) mma_bf16(macc[ct][jt], a, bb[jt][0], bb[jt][1]);
        }
        dh_tile_epilogue<N, DHC>(Dh(b, s) + rw * MP_LD, hs + rw * MP_LD, Dh(b, N) + rw * MP_LD, acc, ckx(b) + rw * (DHC ? N : 1),
                                 ck0(b) + rw * N, cpre(b) + rw * N, BT - t0 - rw, s, 0, lane);
        __syncthreads();   // the finished dH^k tiles
        // sublayer k - 1's post-mix backward on them: dy and res^T dH^k with 8 channels of one token
        // per thread and step (the post-mix backward kernel's arithmetic: the same values)
        for (int e = threadIdx.x; e < TT * 8; e += blockDim.x) {
            int r = e >> 3, c8 = (e & 7) * 8, t = t0 + r;
            if (t >= BT) continue;
            float rr[N * N], pp[N];
#pragma unroll
            for (int q = 0; q < N * N; q++) rr[q] = cres(b)[r * N * N + q];
#pragma unroll
            for (int i = 0; i < N; i++) pp[i] = cpost(b)[r * N + i];
            x128 dv[N], dyo;
#pragma unroll
            for (int i = 0; i < N; i++) dv[i] = *reinterpret_cast<const x128 *>(Dh(b, i) + r * MP_LD + c8);
#pragma unroll
            for (int q = 0; q < X128; q++) {
                float dyv = 0.0f;
#pragma unroll
                for (int i = 0; i < N; i++) dyv += pp[i] * tof(dv[i].v[q]);
                dyo.v[q] = tox(dyv);
            }
            store128(dym + (size_t)t * C + c0 + c8, dyo);
#pragma unroll
            for (int jj = 0; jj < N; jj++) store128(dHm + ((size_t)t * N + jj) * C + c0 + c8, res_t_mix<N>(rr, dv, jj));
        }
        // and the per-token sums over this block's 64 channels (dres, dpost) on tensor cores
        bd_token_sums<N>(part, Dh(b, 0), S::TILE, Pv(b, 0), t0, BT, warp, lane);
        __syncthreads();   // buffer b is refilled next iteration
    }
    bd_store_mpart<N, m, MT>(Mpart, macc, s, C, c0, warp, lane);
}

// dpost, dres of sublayer k - 1 = the sums of the boundary kernel's per-channel-range parts, in order
__global__ void hc_dpost_reduce_kernel(float *dpost, float *dres, const float *part, int BT, int n, int ranges) {
    int np = n + n * n;
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)BT * np) return;
    float s = 0.0f;
    for (int r = 0; r < ranges; r++) s += part[(size_t)r * BT * np + e];
    size_t t = e / np;
    int q = (int)(e % np);
    if (q < n) dpost[t * n + q] = s;
    else dres[t * n * n + q - n] = s;
}


template <int N, bool DHC>
static void hc_boundary_launch(floatX *dH, float *dphi, int accumulate, const floatX *dp, const float *kx, const float *k0,
                               const floatX *phi, const floatX *du, const float *pre, const HcPrev *pv, int BT, int C) {
    using S = BdShape<N>;
    static bool attr = false;
    if (!attr) {   // over the 48 KB default: opt in once per instantiation
        cudaCheck(cudaFuncSetAttribute(hc_boundary_backward_kernel<N, DHC>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM));
        attr = true;
    }
    // token groups x channel ranges: one wave of three blocks on each of an H100's 132 SMs. A
    // constant, not the device's SM count: the dphi sums (over the groups) must not depend on the GPU
    int ranges = C / 64, tiles = ceil_div(BT, S::TT), G = max(1, 3 * 132 / ranges), tpg = ceil_div(tiles, G);
    G = ceil_div(tiles, tpg);
    size_t count = (size_t)N * C * S::m, gm = (size_t)G * (4 / N);
    // slot 5: the coefficient stream reads the parts while the main stream goes on (joined before
    // the next boundary kernel, in hc_coeffs_backward)
    float *Mpart = (float *)dscratch(5, (gm * count + (size_t)ranges * BT * S::NP) * sizeof(float));
    float *part = Mpart + gm * count;
    hc_boundary_backward_kernel<N, DHC><<<dim3(G, ranges), 128, S::SMEM>>>(pv->dH, pv->dy, part, Mpart, dH, dp, kx, k0, phi, du, pre,
                                                                           pv->H, pv->y, pv->post, pv->res, BT, C, tpg);
    kernelCheck();
    // the reduces on the coefficient stream (dHC's parameter gradients read its dphi sums there too)
    cudaStream_t s = coef_begin();
    mhc_dphi_reduce_kernel<<<ceil_div(count, 256), 256, 0, s>>>(dphi, Mpart, (int)gm, count, accumulate);
    kernelCheck();
    hc_dpost_reduce_kernel<<<ceil_div((size_t)BT * S::NP, 256), 256, 0, s>>>(pv->dpost, pv->dres, part, BT, N, ranges);
    kernelCheck();
    coef_end();
}

template <bool DHC>
static void hc_boundary(int n, floatX *dH, float *dphi, int accumulate, const floatX *dp, const float *kx, const float *k0,
                        const floatX *phi, const floatX *du, const float *pre, const HcPrev *pv, int BT, int C) {
    if (n == 2) hc_boundary_launch<2, DHC>(dH, dphi, accumulate, dp, kx, k0, phi, du, pre, pv, BT, C);
    else if (n == 4) hc_boundary_launch<4, DHC>(dH, dphi, accumulate, dp, kx, k0, phi, du, pre, pv, BT, C);
    else die("internal: the fused backward boundary takes n = 2 or 4 (n=%d)", n);
}

// the tensor-core products (mHC's, and dHC's through its block-diagonal phi) apply: C a multiple of 64 (a 64-column tile lies in one stream),
// rows of m = n^2 + 2n bf16 in 16-byte pieces (n even). g_hc_fused = 0 forces the plain kernels
// (the tests compare the two paths)
static int g_hc_fused = 1;
static int hc_tensor_cores(int C, int m) { return g_hc_fused && C % 64 == 0 && m % 8 == 0; }

// dhc through the same tensor-core kernels. dhc projects each LayerNorm-ed stream row onto n+2
// vectors W_q (Wa's n+1 columns, Wb): x_hat . (lnw o W_q) + lnb . W_q. With g_q = bf16(lnw o W_q),
// x_hat . g_q = rstd (h . g_q - mean sum(g_q)), so all rows of a token are one product
// vec(H) @ phi with the block-diagonal phi[(i, c)][(i, q)] = g_q[c], m = n (n + 2) = n^2 + 2n
// columns: the width of mHC's phi. The backward's dH terms take the same shape (dp @ phi^T plus
// per-row multiples of H and 1), and the parameter gradients come from H^T dp.
// Per sublayer: phi (nC x m bf16) and gc = [sum_c g_q | sum_c lnb W_q] (2 (n+2) floats).
__global__ void dhc_phi_kernel(floatX *phi, const float *lnw, const float *Wa, const float *Wb, int n, int C) {
    int k = blockIdx.y, m = n * (n + 2), n1 = n + 1;
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n * C * m) return;
    int row = (int)(e / m), col = (int)(e % m), i = row / C, c = row % C, i2 = col / (n + 2), q = col % (n + 2);
    const float *lw = lnw + (size_t)k * C, *wa = Wa + (size_t)k * C * n1, *wb = Wb + (size_t)k * C;
    phi[(size_t)k * n * C * m + e] = tox(i == i2 ? lw[c] * (q < n1 ? wa[c * n1 + q] : wb[c]) : 0.0f);
}

// one block per (q, sublayer); fixed-order block reduction
__global__ void dhc_gc_kernel(float *gc, const float *lnw, const float *lnb, const float *Wa, const float *Wb, int n, int C) {
    __shared__ float sg[256], sc[256];
    int q = blockIdx.x, k = blockIdx.y, n1 = n + 1;
    const float *lw = lnw + (size_t)k * C, *lb = lnb + (size_t)k * C, *wa = Wa + (size_t)k * C * n1, *wb = Wb + (size_t)k * C;
    float a = 0.0f, b = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float w = q < n1 ? wa[c * n1 + q] : wb[c];
        a += tof(tox(lw[c] * w));   // the bf16 value phi holds
        b += lb[c] * w;
    }
    sg[threadIdx.x] = a;
    sc[threadIdx.x] = b;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) { sg[threadIdx.x] += sg[threadIdx.x + h]; sc[threadIdx.x] += sc[threadIdx.x + h]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        gc[(size_t)k * 2 * (n + 2) + q] = sg[0];
        gc[(size_t)k * 2 * (n + 2) + n + 2 + q] = sc[0];
    }
}

// per (token, stream) row r: x_hat . g_q from the product p, then the gates as dhc_coeffs_forward_kernel;
// xg (n+2 per row) kept for the backward
template <int N>
__global__ void dhc_coeffs_proj_kernel(float *pre, float *post, float *res, float *ta, float *tb, float *xg, const float *p,
                                       const float *mean, const float *rstd, const float *gc, const float *A, const float *b,
                                       const float *sa, const float *sb, int R) {
    constexpr int ng = N + 2, m = N * ng;
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    dhc_gates_row<N>(pre, post, res, ta, tb, xg, p + (size_t)(r / N) * m + (r % N) * ng, mean[r], rstd[r], gc, A, b, sa, sb, r);
}

// per (token, stream i), G threads per token as in Sinkhorn: gate gradients gr, dp = bf16(rstd gr) in
// the block layout, the LayerNorm backward's per-row constants (dH += dp @ phi^T + kx H + k0), and
// one row per token for the column sums: [dA (n (n+1)) | db (n) | dsa | dsb | s0 = sum gr (n+2) |
// s1 = sum mean dp (n+2)], the last four summed over the group. (One thread per token: 19 us per
// d12 call, 4 warps per SM.)
template <int N>
__global__ void dhc_coeffs_backward_proj_kernel(floatX *dp, float *kx, float *k0, float *rows, const float *dpre, const float *dpost,
                                                const float *dres, const float *mean, const float *rstd, const float *ta, const float *tb,
                                                const float *xg, const float *gc, const float *sa, const float *sb, int BT, int C) {
    constexpr int n = N, n1 = N + 1, ng = N + 2, m = N * ng, w = N * n1 + N + 2, G = SkGroup<N>::G;
    int gt = blockIdx.x * blockDim.x + threadIdx.x, bt = gt / G, i = gt % G;
    bool live = bt < BT && i < n;
    float *row = rows + (size_t)(live ? bt : 0) * (w + 2 * ng), acc[2 + 2 * ng];   // dsa, dsb, s0, s1 of this stream
#pragma unroll
    for (int q = 0; q < 2 + 2 * ng; q++) acc[q] = 0.0f;
    if (live) {
        size_t r = (size_t)bt * n + i;
        const float *t = ta + r * n1;
        float gr[ng];
#pragma unroll
        for (int q = 0; q < n1; q++) {
            float dAt = q == 0 ? dpre[r] : dres[(size_t)bt * n * n + (q - 1) * n + i];
            row[i * n1 + q] = dAt;
            acc[0] += dAt * t[q];
            gr[q] = dAt * sa[0] * (1.0f - t[q] * t[q]);
        }
        float dbt = dpost[r], tbr = tb[r];
        row[n * n1 + i] = dbt;
        acc[1] += dbt * tbr;
        gr[n1] = dbt * sb[0] * (1.0f - tbr * tbr);
        float mu = mean[r], rs = rstd[r], a = 0.0f, bb = 0.0f;
#pragma unroll
        for (int q = 0; q < ng; q++) {
            a += gr[q] * gc[q];
            bb += gr[q] * xg[r * ng + q];
            floatX d = tox(rs * gr[q]);
            dp[(size_t)bt * m + i * ng + q] = d;
            acc[2 + q] += gr[q];
            acc[2 + ng + q] += mu * tof(d);   // the rounded value the H^T dp product sees
        }
        a /= C;
        bb /= C;
        kx[r] = -rs * rs * bb;
        k0[r] = rs * (rs * bb * mu - a);
    }
    group_sum<N, 2 + 2 * ng>(acc);
    if (live && i == 0) {
        row[n * n1 + n] = acc[0];
        row[n * n1 + n + 1] = acc[1];
#pragma unroll
        for (int q = 0; q < ng; q++) { row[w + q] = acc[2 + q]; row[w + ng + q] = acc[2 + ng + q]; }
    }
}

// per channel: dWa, dWb, dlnw, dlnb from the diagonal blocks of M = H^T dp (nC x m) and the column
// sums s0, s1: sum_r gr_q x_hat[r][c] = sum_i M[(i, c)][(i, q)] - s1[q]
__global__ void dhc_param_proj_kernel(float *dWa, float *dWb, float *dlnw, float *dlnb, const float *M, const float *s,
                                      const float *lnw, const float *lnb, const float *Wa, const float *Wb, int n, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, ng = n + 2, n1 = n + 1, m = n * ng;
    if (c >= C) return;
    float gw = 0.0f, gb = 0.0f;
    for (int q = 0; q < ng; q++) {
        float xgc = -s[ng + q];
        for (int i = 0; i < n; i++) xgc += M[((size_t)i * C + c) * m + i * ng + q];
        float w = q < n1 ? Wa[c * n1 + q] : Wb[c], d = lnw[c] * xgc + lnb[c] * s[q];
        if (q < n1) dWa[c * n1 + q] += d;
        else dWb[c] += d;
        gw += w * xgc;
        gb += w * s[q];
    }
    dlnw[c] += gw;
    dlnb[c] += gb;
}
#endif

// the mHC and dHC backward add the pre-mix term pre_i du to dH in their tensor-core pass
static int hc_fuses_premix(const GPTHCConfig *c) {
#if defined(ENABLE_FP32)
    (void)c;
    return 0;
#else
    return (c->mode == MODE_MHC || c->mode == MODE_DHC) && hc_tensor_cores(c->channels, mhc_width(c->n));
#endif
}

// kernels across sublayer boundaries: the post-mix of sublayer k and the projection of sublayer
// k + 1 (hc_postmix_proj_kernel); the dH pass of k and the post-mix backward of k - 1
// (hc_boundary_backward_kernel)
static int hc_fused_boundary(const GPTHCConfig *c) {
    static int off = -1;   // GPT_HC_FUSE_BOUNDARY=0: the kernels apart (comparisons)
    if (off < 0) off = getenv("GPT_HC_FUSE_BOUNDARY") && atoi(getenv("GPT_HC_FUSE_BOUNDARY")) == 0;
    return !off && hc_fuses_premix(c) && (c->n == 2 || c->n == 4);
}


__global__ void mhc_small_scatter_kernel(float *dbias, float *dalpha, const float *sums, int m) {
    for (int k = threadIdx.x; k < m + 3; k += blockDim.x) {
        if (k < m) dbias[k] += sums[k];
        else dalpha[k - m] += sums[k];
    }
}

// h = sum_i H_i (the backward's dx0 = sum_i dH^0_i), one warp per token, 16 bytes a lane
__global__ void stream_sum_kernel(floatX *h, const floatX *H, int BT, int n, int C) {
    int bt = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (bt >= BT) return;
    for (int c = lane * X128; c < C; c += 32 * X128) {
        float s[X128] = {};
        for (int i = 0; i < n; i++) add128(s, load128(H + ((size_t)bt * n + i) * C + c));
        store128(h + (size_t)bt * C + c, pack128(s));
    }
}

// AdamW on fp32 master weights, then the floatX copy
__global__ void adamw_kernel(float *p, floatX *px, const float *g, float *m, float *v, size_t N, float lr, float b1, float b2,
                             float bc1, float bc2, float eps, float wd, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float gi = g[i] * scale;
    float mi = b1 * m[i] + (1.0f - b1) * gi, vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i] - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
    p[i] = pi;
    if (px != (floatX *)p) px[i] = tox(pi);
}

__global__ void accumulate_kernel(float *acc, const float *x, size_t N) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) acc[i] += x[i];
}

__global__ void to_floatx_kernel(floatX *out, const float *in, size_t N) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) out[i] = tox(in[i]);
}

// sum of squares of each NORM_CHUNK-float chunk, one block per chunk: the chunks are fixed
// pieces of the parameter vector, so a rank with a shard of it computes the same partials
#define NORM_CHUNK (1 << 16)
__global__ void sumsq_partial_kernel(double *partial, const float *g) {
    size_t b0 = (size_t)blockIdx.x * NORM_CHUNK;
    double s = 0.0;
    for (size_t i = b0 + threadIdx.x; i < b0 + NORM_CHUNK; i += blockDim.x) s += (double)g[i] * g[i];
    __shared__ double sh[1024];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

// ----------------------------------------------------------------------------
// the model

// activations: floatX tensors, then fp32 tensors (statistics and HC coefficients)
#define NUM_ACTX 12
#define NUM_ACTF 16
typedef struct {
    floatX *H, *u, *y, *ln, *qkv, *atty, *att, *fch, *fch_gelu, *hsum, *lnf, *logits;
    // mhc_z: mHC's logits z; for dHC (fused path) x_hat . (lnw o W_q) per stream row, the same size
    float *ln_mean, *ln_rstd, *pre, *post, *res, *hcn_mean, *hcn_rstd, *hc_ta, *hc_tb, *mhc_rms, *mhc_z, *lnf_mean, *lnf_rstd, *losses, *lse, *att_lse;
} ActivationTensors;

// slots: stored stream states H^k (K without recomputation: H^K is not kept, see hstate)
static void fill_activation_sizes(size_t *sx, size_t *sf, const GPTHCConfig *c, int B, int T, int slots) {
    size_t BT = (size_t)B * T, C = c->channels, L = c->num_layers, K = 2 * L, n = c->n, NH = c->num_heads, Vp = c->padded_vocab_size;
    int hc = c->mode != MODE_RESIDUAL, dhc = c->mode == MODE_DHC, mhc = c->mode == MODE_MHC, fa = attn_impl((int)C, (int)NH, B, T) != ATTN_CUBLAS;
    size_t x[NUM_ACTX] = {(size_t)slots * BT * n * C, hc && !hc_ln_fused((int)C) ? K * BT * C : 0, K * BT * C, K * BT * C, L * BT * 3 * C, L * BT * C,
                          fa ? 0 : L * B * NH * T * T, L * BT * 4 * C, L * BT * 4 * C, BT * C, BT * C, BT * Vp};
    size_t f[NUM_ACTF] = {K * BT, K * BT, hc ? K * BT * n : 0, hc ? K * BT * n : 0, hc ? K * BT * n * n : 0,
                          dhc ? K * BT * n : 0, dhc ? K * BT * n : 0, dhc ? K * BT * n * (n + 1) : 0, dhc ? K * BT * n : 0,
                          mhc ? K * BT : 0, mhc || dhc ? K * BT * mhc_width(n) : 0, BT, BT, BT, BT, fa ? L * B * NH * T : 0};
    memcpy(sx, x, sizeof(x));
    memcpy(sf, f, sizeof(f));
}

// the gradients of the activations: the backward needs one sublayer's at a time, so each holds
// one sublayer (or layer), and the stream-state gradient two states (dH^{k+1} and dH^k, by parity
// of k). Sizing them like the activations cost 6.7 GB at d12 (n = 4).
static void fill_grad_activation_sizes(size_t *sx, size_t *sf, const GPTHCConfig *c, int B, int T) {
    size_t BT = (size_t)B * T, C = c->channels, n = c->n, Vp = c->padded_vocab_size;
    int hc = c->mode != MODE_RESIDUAL;
    size_t x[NUM_ACTX] = {2 * BT * n * C, hc ? BT * C : 0, hc ? 2 * BT * C : 0, BT * C, BT * 3 * C, BT * C, 0, BT * 4 * C, 0, BT * C, BT * C, BT * Vp};
    size_t f[NUM_ACTF] = {0, 0, hc ? BT * n : 0, hc ? BT * n : 0, hc ? BT * n * n : 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(sx, x, sizeof(x));
    memcpy(sf, f, sizeof(f));
}

static void point_activations(ActivationTensors *a, floatX *mx, float *mf, const size_t *sx, const size_t *sf) {
    floatX **px[NUM_ACTX] = {&a->H, &a->u, &a->y, &a->ln, &a->qkv, &a->atty, &a->att, &a->fch, &a->fch_gelu, &a->hsum, &a->lnf, &a->logits};
    float **pf[NUM_ACTF] = {&a->ln_mean, &a->ln_rstd, &a->pre, &a->post, &a->res, &a->hcn_mean, &a->hcn_rstd, &a->hc_ta,
                            &a->hc_tb, &a->mhc_rms, &a->mhc_z, &a->lnf_mean, &a->lnf_rstd, &a->losses, &a->lse, &a->att_lse};
    for (int i = 0; i < NUM_ACTX; i++) { *px[i] = mx; mx += sx[i]; }
    for (int i = 0; i < NUM_ACTF; i++) { *pf[i] = mf; mf += sf[i]; }
}

// the wte backward's host-built index: positions [BT], chunks [4 per chunk, at most BT], multi-chunk
// buckets [3 each, at most BT]
#define WTE_BUCKET_INTS(BT) (8 * (BT))
typedef struct {
    GPTHCConfig config;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_parameters;
    ParameterTensors params, grads;   // fp32 on the device: master weights and gradients
    float *params_memory, *grads_memory, *m_memory, *v_memory;
    floatX *paramsx_memory;           // the floatX copy matmuls read (== params in FP32 builds)
    size_t padded_params;             // params, grads: num_parameters rounded up to world * NORM_CHUNK
    size_t shard_lo, shard_n;         // this rank's AdamW range (ZeRO-1), else [0, padded_params)
    int grads_fresh;                  // no micro-batch accumulated since gpt_zero_grad
    float *wte_acc;                   // one micro-batch's wte gradient (accumulation after the first)
    float *host_params, *host_m, *host_v;
    int moments_ready;
    ActivationTensors acts, grads_acts;
    size_t act_sizes_x[NUM_ACTX], act_sizes_f[NUM_ACTF], gact_sizes_x[NUM_ACTX], gact_sizes_f[NUM_ACTF];
    floatX *actsx_memory, *gactsx_memory;
    float *actsf_memory, *gactsf_memory;
    size_t num_actx, num_actf, num_gactx, num_gactf;
    int rc_len;                       // recomputation: stream states kept every rc_len sublayers (1: all kept)
    int batch_size, seq_len, last_B, last_T;
    int *inputs, *targets;            // device
    int *host_inputs;                 // the last forward's tokens
    int *bucket_count, *host_buckets, *buckets;   // token-id buckets and their chunks for the wte backward
    int *host_toks, *host_offs;                   // distinct tokens of the batch, bucket offsets
    float *host_losses, *host_res;
    float mean_loss;
    floatX *dhc_phi;                  // dhc's block-diagonal projections and their sums, per sublayer,
    float *dhc_gc;                    // rebuilt from the weights by every forward (fused path)
    uint2 *phif;                      // mhc's phi or dhc_phi as B fragments (phi_frag_kernel), per sublayer, per forward
} GPTHC;

// floatX pointer to parameter tensor i
static floatX *px(GPTHC *m, int i) {
    size_t off = 0;
    for (int j = 0; j < i; j++) off += m->param_sizes[j];
    return m->paramsx_memory + off;
}

static void gpt_init_device(void) {
    static int done = 0;
    if (done) return;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) die("no CUDA device found (%s); use ./train_gpt_hc on the CPU", cudaGetErrorString(e));
    cublasCheck(cublasCreate(&g_cublas));
    cublasCheck(cublasLtCreate(&g_cublaslt));
    cudaCheck(cudaMalloc(&g_lt_workspace, LT_WORKSPACE));
#if defined(ENABLE_FP32)
    cublasCheck(cublasSetMathMode(g_cublas, CUBLAS_PEDANTIC_MATH));   // no TF32: the tests compare to float64
#else
    cublasCheck(cublasSetMathMode(g_cublas, CUBLAS_DEFAULT_MATH));
    flash_init();
#endif
    done = 1;
}

static void gpt_upload_params(GPTHC *model) {
    cudaCheck(cudaMemcpy(model->params_memory, model->host_params, model->num_parameters * sizeof(float), cudaMemcpyHostToDevice));
    if ((void *)model->paramsx_memory != (void *)model->params_memory) {
        to_floatx_kernel<<<ceil_div(model->num_parameters, 256), 256>>>(model->paramsx_memory, model->params_memory, model->num_parameters);
        kernelCheck();
    }
}

static void gpt_allocate(GPTHC *model) {
    gpt_init_device();
    if (model->config.channels % 8 != 0)   // 16-byte vector access in the stream kernels
        die("the CUDA trainer needs channels to be a multiple of 8 (model has C = %d); use ./train_gpt_hc", model->config.channels);
    fill_param_sizes(model->param_sizes, &model->config);
    model->num_parameters = count_params(&model->config);
    size_t P = model->num_parameters, unit = (size_t)g_multi.world * NORM_CHUNK;
    model->padded_params = (P + unit - 1) / unit * unit;   // zeros past P: equal shards, whole chunks
    size_t Pp = model->padded_params;
    model->shard_lo = g_multi.zero ? g_multi.rank * (Pp / g_multi.world) : 0;
    model->shard_n = g_multi.zero ? Pp / g_multi.world : Pp;
    cudaCheck(cudaMalloc(&model->params_memory, Pp * sizeof(float)));
    cudaCheck(cudaMemset(model->params_memory, 0, Pp * sizeof(float)));
#if defined(ENABLE_FP32)
    model->paramsx_memory = model->params_memory;
#else
    cudaCheck(cudaMalloc(&model->paramsx_memory, Pp * sizeof(floatX)));
    cudaCheck(cudaMemset(model->paramsx_memory, 0, Pp * sizeof(floatX)));
#endif
    point_parameters(&model->params, model->params_memory, model->param_sizes);
    model->host_params = (float *)callocCheck(P, sizeof(float));
}

void gpt_build_fresh(GPTHC *model, const GPTHCConfig *cfg, uint64_t seed) {
    memset(model, 0, sizeof(*model));
    model->config = *cfg;
    gpt_allocate(model);
    init_params(model->host_params, model->param_sizes, cfg, seed);   // on the host, as the CPU trainer
    gpt_upload_params(model);
}

void gpt_build_from_checkpoint(GPTHC *model, const char *path) {
    memset(model, 0, sizeof(*model));
    FILE *fp = fopenCheck(path, "rb");
    GPTHCConfig cfg;
    read_model_header(fp, path, &cfg);
    model->config = cfg;
    gpt_allocate(model);
    freadCheck(model->host_params, sizeof(float), model->num_parameters, fp, path);
    fclose(fp);
    gpt_upload_params(model);
}

// Recomputation (mHC paper 4.3.2): with rc_len = Lr > 1 the forward keeps the stream state H^k only
// at block boundaries (k a multiple of Lr); the states inside a block share Lr - 1 slots that every
// block overwrites, and the backward recomputes a block's inner states (H^{k+1} = res H^k + post y^k
// from the kept y and coefficients, bit for bit the forward's) before it walks back through that
// block. Slots: [boundaries 0, Lr, 2 Lr, ... < K | inner 1..Lr-1]. The last state H^K is never
// stored (the last sublayer writes h = sum_i H^K_i): hstate(K) is NULL.
static int hstate_bounds(const GPTHC *m) { return ceil_div(2 * m->config.num_layers, m->rc_len); }
static int hstate_slots(const GPTHC *m) { return m->rc_len == 1 ? 2 * m->config.num_layers : hstate_bounds(m) + m->rc_len - 1; }
static floatX *hstate(GPTHC *m, int k) {
    int K = 2 * m->config.num_layers, Lr = m->rc_len, slot;
    if (k == K) return NULL;
    if (Lr == 1) slot = k;
    else if (k % Lr == 0) slot = k / Lr;
    else slot = hstate_bounds(m) + k % Lr - 1;
    return m->acts.H + (size_t)slot * m->last_B * m->last_T * m->config.n * m->config.channels;
}

// Lr: 1 keeps every state, 0 takes the paper's Lr = sqrt(n K / (n + 2)) (K sublayers), rounded;
// the residual mode keeps every state. Before the first forward (it sizes the activations).
void gpt_set_recompute(GPTHC *model, int Lr) {
    if (model->actsx_memory != NULL) die("internal: gpt_set_recompute after the activations were allocated");
    const GPTHCConfig *c = &model->config;
    int K = 2 * c->num_layers;
    if (Lr == 0) Lr = (int)lround(sqrt((double)c->n * K / (c->n + 2)));
    if (Lr < 1 || c->mode == MODE_RESIDUAL) Lr = 1;
    model->rc_len = Lr > K ? K : Lr;
}
int gpt_recompute(const GPTHC *model) { return model->rc_len < 1 ? 1 : model->rc_len; }

void gpt_ensure_activations(GPTHC *model, int B, int T) {
    if (model->actsx_memory != NULL) {
        if (B > model->batch_size || T > model->seq_len)
            die("internal: forward with B=%d T=%d after allocating for B=%d T=%d", B, T, model->batch_size, model->seq_len);
        return;
    }
    model->batch_size = B;
    model->seq_len = T;
    if (model->rc_len < 1) model->rc_len = 1;
    fill_activation_sizes(model->act_sizes_x, model->act_sizes_f, &model->config, B, T, hstate_slots(model));
    fill_grad_activation_sizes(model->gact_sizes_x, model->gact_sizes_f, &model->config, B, T);
    model->num_actx = model->num_actf = model->num_gactx = model->num_gactf = 0;
    // 256-byte aligned tensors: cuBLAS may choose its kernel by alignment, so the layout (e.g. with
    // recomputation) does not change the results
    for (int i = 0; i < NUM_ACTX; i++) {
        model->act_sizes_x[i] = (model->act_sizes_x[i] + 127) / 128 * 128;
        model->gact_sizes_x[i] = (model->gact_sizes_x[i] + 127) / 128 * 128;
        model->num_actx += model->act_sizes_x[i];
        model->num_gactx += model->gact_sizes_x[i];
    }
    for (int i = 0; i < NUM_ACTF; i++) {
        model->act_sizes_f[i] = (model->act_sizes_f[i] + 63) / 64 * 64;
        model->gact_sizes_f[i] = (model->gact_sizes_f[i] + 63) / 64 * 64;
        model->num_actf += model->act_sizes_f[i];
        model->num_gactf += model->gact_sizes_f[i];
    }
    cudaCheck(cudaMalloc(&model->actsx_memory, model->num_actx * sizeof(floatX)));
    cudaCheck(cudaMalloc(&model->actsf_memory, model->num_actf * sizeof(float)));
    point_activations(&model->acts, model->actsx_memory, model->actsf_memory, model->act_sizes_x, model->act_sizes_f);
    // the activation gradients too: a forward with targets writes the classifier's dlogits
    cudaCheck(cudaMalloc(&model->gactsx_memory, model->num_gactx * sizeof(floatX)));
    cudaCheck(cudaMalloc(&model->gactsf_memory, model->num_gactf * sizeof(float)));
    point_activations(&model->grads_acts, model->gactsx_memory, model->gactsf_memory, model->gact_sizes_x, model->gact_sizes_f);
    cudaCheck(cudaMalloc(&model->inputs, (size_t)B * T * sizeof(int)));
    cudaCheck(cudaMalloc(&model->targets, (size_t)B * T * sizeof(int)));
    model->host_losses = (float *)mallocCheck((size_t)B * T * sizeof(float));
    model->host_inputs = (int *)mallocCheck((size_t)B * T * sizeof(int));
    model->bucket_count = (int *)callocCheck(model->config.vocab_size + 1, sizeof(int));
    model->host_toks = (int *)mallocCheck((size_t)B * T * sizeof(int));
    model->host_offs = (int *)mallocCheck(((size_t)B * T + 1) * sizeof(int));
    model->host_buckets = (int *)mallocCheck(WTE_BUCKET_INTS((size_t)B * T) * sizeof(int));
    cudaCheck(cudaMalloc(&model->buckets, WTE_BUCKET_INTS((size_t)B * T) * sizeof(int)));
}

// ln_done: the sublayer's LayerNorm was already computed (fused with the residual add before it)
static void sublayer_forward(GPTHC *model, int k, const floatX *u, int B, int T, int ln_done = 0) {
    const GPTHCConfig *c = &model->config;
    ActivationTensors *a = &model->acts;
    size_t BT = (size_t)B * T, C = c->channels, l = k / 2, NH = c->num_heads;
    floatX *ln = a->ln + k * BT * C, *y = a->y + k * BT * C;
    float *mean = a->ln_mean + k * BT, *rstd = a->ln_rstd + k * BT;
    if (k % 2 == 0) {
        floatX *qkv = a->qkv + l * BT * 3 * C, *atty = a->atty + l * BT * C, *att = a->att + l * B * NH * T * T;
        if (!ln_done) layernorm_forward(ln, mean, rstd, u, px(model, P_LN1W) + l * C, px(model, P_LN1B) + l * C, BT, C);
        matmul_forward(qkv, ln, px(model, P_QKVW) + l * 3 * C * C, px(model, P_QKVB) + l * 3 * C, BT, C, 3 * C);
        attention_forward(atty, att, a->att_lse + l * B * NH * T, qkv, B, T, C, NH);
        matmul_forward(y, atty, px(model, P_ATTPROJW) + l * C * C, px(model, P_ATTPROJB) + l * C, BT, C, C);
    } else {
        floatX *fch = a->fch + l * BT * 4 * C, *fchg = a->fch_gelu + l * BT * 4 * C;
        if (!ln_done) layernorm_forward(ln, mean, rstd, u, px(model, P_LN2W) + l * C, px(model, P_LN2B) + l * C, BT, C);
        matmul_forward(fchg, ln, px(model, P_FCW) + l * 4 * C * C, px(model, P_FCB) + l * 4 * C, BT, C, 4 * C, fch);   // GELU fused
        matmul_forward(y, fchg, px(model, P_FCPROJW) + l * C * 4 * C, px(model, P_FCPROJB) + l * C, BT, 4 * C, C);
    }
}

// du = d(sublayer input), or with dres: du = dres + d(sublayer input); parameter grads accumulated.
// u NULL: the LayerNorm backward is left to the caller (its input gradient is in grads_acts.ln)
static void sublayer_backward(GPTHC *model, int k, floatX *du, const floatX *dy, const floatX *u, int B, int T, const floatX *dres = NULL) {
    const GPTHCConfig *c = &model->config;
    ParameterTensors *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    size_t BT = (size_t)B * T, C = c->channels, l = k / 2, NH = c->num_heads;
    floatX *ln = a->ln + k * BT * C, *dln = ga->ln;   // activation gradients hold one sublayer
    float *mean = a->ln_mean + k * BT, *rstd = a->ln_rstd + k * BT;
    if (k % 2 == 0) {
        floatX *qkv = a->qkv + l * BT * 3 * C, *atty = a->atty + l * BT * C, *att = a->att + l * B * NH * T * T;
        floatX *dqkv = ga->qkv, *datty = ga->atty;
        matmul_backward(datty, g->attprojw + l * C * C, g->attprojb + l * C, dy, atty, px(model, P_ATTPROJW) + l * C * C, BT, C, C);
        attention_backward(dqkv, datty, atty, att, a->att_lse + l * B * NH * T, qkv, B, T, C, NH);
        matmul_backward(dln, g->qkvw + l * 3 * C * C, g->qkvb + l * 3 * C, dqkv, ln, px(model, P_QKVW) + l * 3 * C * C, BT, C, 3 * C);
        if (u) layernorm_backward(du, g->ln1w + l * C, g->ln1b + l * C, dln, u, px(model, P_LN1W) + l * C, mean, rstd, BT, C, dres, dres == NULL);
    } else {
        floatX *fch = a->fch + l * BT * 4 * C, *fchg = a->fch_gelu + l * BT * 4 * C;
        floatX *dfch = ga->fch;
        matmul_backward(dfch, g->fcprojw + l * C * 4 * C, g->fcprojb + l * C, dy, fchg, px(model, P_FCPROJW) + l * C * 4 * C, BT, 4 * C, C,
                        fch);   // GELU backward fused
        matmul_backward(dln, g->fcw + l * 4 * C * C, g->fcb + l * 4 * C, dfch, ln, px(model, P_FCW) + l * 4 * C * C, BT, C, 4 * C);
        if (u) layernorm_backward(du, g->ln2w + l * C, g->ln2b + l * C, dln, u, px(model, P_LN2W) + l * C, mean, rstd, BT, C, dres, dres == NULL);
    }
}

// proj_done: the projection (and its statistics) of H^k came with the previous post-mix (hc_fused_boundary);
// 2: the gates too (hc_fwd_boundary_kernel): only mHC's Sinkhorn-Knopp is left
static void hc_coeffs_forward(GPTHC *model, int k, const floatX *Hk, int BT, int proj_done) {
    ProfScope prof(PROF_HC_COEF);
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params;
    ActivationTensors *a = &model->acts;
    int n = c->n, C = c->channels, m = mhc_width(n);
    float *pre = a->pre + (size_t)k * BT * n, *post = a->post + (size_t)k * BT * n, *res = a->res + (size_t)k * BT * n * n;
    if (c->mode == MODE_SHC) {
        shc_coeffs_forward_kernel<<<ceil_div(BT, 128), 128>>>(pre, post, res, p->hc_A + (size_t)k * n * (n + 1), p->hc_b + (size_t)k * n, BT, n);
    } else if (c->mode == MODE_DHC) {
#if !defined(ENABLE_FP32)
        if (hc_tensor_cores(C, m)) {
            if (proj_done == 2) return;
            size_t o1 = (size_t)k * BT * n;
            float *pbuf = (float *)dscratch(0, (size_t)BT * m * sizeof(float));
            if (!proj_done)
                DISPATCH_N_DHC(n, mhc_proj_forward_kernel, ceil_div(BT, 64), 128, pbuf, a->hcn_mean + o1, a->hcn_rstd + o1, Hk,
                               model->dhc_phi + (size_t)k * n * C * m, BT, n * C, C);
            DISPATCH_N(n, dhc_coeffs_proj_kernel, ceil_div(BT * n, 128), 128, pre, post, res, a->hc_ta + o1 * (n + 1), a->hc_tb + o1,
                       a->mhc_z + (size_t)k * BT * m, pbuf, a->hcn_mean + o1, a->hcn_rstd + o1, model->dhc_gc + (size_t)k * 2 * (n + 2),
                       p->hc_A + (size_t)k * n * (n + 1), p->hc_b + (size_t)k * n, p->hc_sa + k, p->hc_sb + k, BT * n);
            return;
        }
#endif
        DISPATCH_N(n, dhc_coeffs_forward_kernel, ceil_div((size_t)BT * n, 4), 128, pre, post, res, a->hcn_mean + (size_t)k * BT * n, a->hcn_rstd + (size_t)k * BT * n,
                                                  a->hc_ta + (size_t)k * BT * n * (n + 1), a->hc_tb + (size_t)k * BT * n, Hk,
                                                  p->hc_A + (size_t)k * n * (n + 1), p->hc_b + (size_t)k * n, p->hc_lnw + (size_t)k * C,
                                                  p->hc_lnb + (size_t)k * C, p->hc_Wa + (size_t)k * C * (n + 1), p->hc_Wb + (size_t)k * C,
                                                  p->hc_sa + k, p->hc_sb + k, BT * n, C);
    } else {
        // p = vec(H) @ phi for all tokens: one GEMM (BT x nC) @ (nC x m), fp32 out
        int nC = n * C;
        float *pbuf = (float *)dscratch(0, (size_t)BT * m * sizeof(float));
        const floatX *phix = px(model, P_MHC_PHI) + (size_t)k * nC * m;
#if !defined(ENABLE_FP32)
        if (hc_tensor_cores(C, m)) {
            if (!proj_done) DISPATCH_N(n, mhc_proj_forward_kernel, ceil_div(BT, 64), 128, pbuf, a->mhc_rms + (size_t)k * BT, NULL, Hk, phix, BT, nC, C);
        } else
#endif
        {
            const float one = 1.0f, zero = 0.0f;
            cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, m, BT, nC, &one, phix, CUBLAS_X, m, Hk, CUBLAS_X, nC, &zero, pbuf,
                                     CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            rms_kernel<<<ceil_div(BT, 4), 128>>>(a->mhc_rms + (size_t)k * BT, Hk, BT, nC);
            kernelCheck();
        }
        // the gates now (the pre-mix needs pre); res, first read by the post-mix, on the coefficient
        // stream (gpt_forward joins it there)
        unsigned grid = ceil_div((size_t)BT * sk_group(n), 128);
        if (proj_done < 2)
            DISPATCH_N(n, mhc_coeffs_forward_kernel, grid, 128, pre, post, res, a->mhc_rms + (size_t)k * BT, a->mhc_z + (size_t)k * BT * m, pbuf,
                       p->mhc_bias + (size_t)k * m, p->mhc_alpha + k * 3, BT, n, c->sinkhorn_iters, 1);
        cudaStream_t s = coef_begin();
        DISPATCH_N_STREAM(n, mhc_coeffs_forward_kernel, grid, 128, s, pre, post, res, a->mhc_rms + (size_t)k * BT, a->mhc_z + (size_t)k * BT * m,
                          (const float *)NULL, p->mhc_bias + (size_t)k * m, p->mhc_alpha + k * 3, BT, n, c->sinkhorn_iters, 2);
        coef_end();
    }
    kernelCheck();
}

// mHC's Sinkhorn-Knopp backward for sublayer k as soon as its dres is known (from the post-mix
// backward of k): on the coefficient stream, beside sublayer k's backward; dres is replaced by the
// res logits' gradient, which hc_coeffs_backward's part 2 reads
static void hc_sinkhorn_backward(GPTHC *model, int k, int BT) {
    const GPTHCConfig *c = &model->config;
    if (c->mode != MODE_MHC) return;
    ProfScope prof(PROF_HC_COEF);
    ParameterTensors *p = &model->params;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    int n = c->n, m = mhc_width(n), iters = c->sinkhorn_iters;
    size_t o1 = (size_t)k * BT * n;
    // the line sums: 2 iters floats per thread, on chip in 64-thread blocks when they fit
    size_t threads = (size_t)BT * sk_group(n), smem = (size_t)2 * iters * 64 * sizeof(float);
    int on_chip = smem <= 48 * 1024 && g_sk_smem, block = on_chip ? 64 : 128;
    unsigned grid = ceil_div(threads, block);
    float *work = on_chip ? NULL : (float *)dscratch(6, (size_t)grid * block * 2 * iters * sizeof(float));
    cudaStream_t s = coef_begin();
    DISPATCH_N_SS(n, mhc_coeffs_backward_kernel, grid, block, on_chip ? smem : 0, s, (floatX *)NULL, (float *)NULL, (float *)NULL,
                  ga->pre, ga->post, ga->res, a->pre + o1, a->post + o1, a->mhc_rms + (size_t)k * BT, a->mhc_z + (size_t)k * BT * m,
                  p->mhc_bias + (size_t)k * m, p->mhc_alpha + k * 3, BT, n, c->channels, iters, work, 1);
    coef_end();
}

// du: the sublayer input's gradient, for mHC's fused dH pass (the pre-mix term; see hc_fuses_premix)
// pv: sublayer k - 1's post-mix backward, fused into the dH pass (hc_fused_boundary); dH^k is then
// not written
static void hc_coeffs_backward(GPTHC *model, int k, floatX *dHk, const floatX *Hk, const floatX *du, int BT, const HcPrev *pv = NULL) {
    ProfScope prof(PROF_HC_COEF);
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params, *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    int n = c->n, C = c->channels, m = mhc_width(n), n1 = n + 1;
    size_t o1 = (size_t)k * BT * n;
    const float *dpre = ga->pre, *dpost = ga->post, *dres = ga->res;   // this sublayer's (one held)
    coef_join();   // dpost, dres (and mHC's Sinkhorn backward) from the coefficient stream
#if !defined(ENABLE_FP32)
    if (c->mode == MODE_DHC && hc_tensor_cores(C, m)) {
        int nC = n * C, ng = n + 2, w = n * n1 + n + 2;
        float *kx = (float *)dscratch(0, (size_t)2 * BT * n * sizeof(float)), *k0 = kx + (size_t)BT * n;
        // slot 7: [rows | dp | M = H^T dp | sums]; rows, M and sums are read on the coefficient stream
        // (rows rounded up to 256 bytes: dp is read in 16-byte pieces, and BT (w + 2 ng) need not be a multiple of 4)
        size_t nrows = ((size_t)BT * (w + 2 * ng) + 63) / 64 * 64, npx = ((size_t)BT * m * sizeof(floatX) + 255) / 256 * 256 / sizeof(float);
        float *rows = (float *)dscratch(7, (nrows + npx + (size_t)nC * m + w + 2 * ng) * sizeof(float));
        floatX *dpx = (floatX *)(rows + nrows);
        float *M = rows + nrows + npx, *sums = M + (size_t)nC * m;
        const float *gc = model->dhc_gc + (size_t)k * 2 * ng;
        DISPATCH_N(n, dhc_coeffs_backward_proj_kernel, ceil_div((size_t)BT * sk_group(n), 128), 128, dpx, kx, k0, rows, dpre, dpost, dres, a->hcn_mean + o1,
                   a->hcn_rstd + o1, a->hc_ta + o1 * n1, a->hc_tb + o1, a->mhc_z + (size_t)k * BT * m, gc, p->hc_sa + k, p->hc_sb + k, BT, C);
        // one pass: dH += pre_i du + dp @ phi^T + kx H + k0, and M = H^T dp, whose diagonal blocks give
        // the per-channel parameter gradients
        if (pv) hc_boundary<true>(n, dHk, M, 0, dpx, kx, k0, model->dhc_phi + (size_t)k * nC * m, du, a->pre + o1, pv, BT, C);
        else mhc_dh<true>(n, dHk, M, 0, Hk, dpx, kx, k0, model->dhc_phi + (size_t)k * nC * m, du, a->pre + o1, BT, C);
        // the parameter gradients sit on no dependency chain of the backward: coefficient stream
        // (joined before the next sublayer's coefficient backward rewrites slot 7)
        cudaStream_t s = coef_begin();
        cudaCheck(cudaMemsetAsync(sums, 0, (w + 2 * ng) * sizeof(float), s));
        colsum(sums, rows, BT, w + 2 * ng, s, 6);
        hc_small_grads_scatter_kernel<<<1, 128, 0, s>>>(g->hc_A + (size_t)k * n * n1, g->hc_b + (size_t)k * n, g->hc_sa + k, g->hc_sb + k, sums, n);
        kernelCheck();
        dhc_param_proj_kernel<<<ceil_div(C, 128), 128, 0, s>>>(g->hc_Wa + (size_t)k * C * n1, g->hc_Wb + (size_t)k * C, g->hc_lnw + (size_t)k * C,
                                                               g->hc_lnb + (size_t)k * C, M, sums + w, p->hc_lnw + (size_t)k * C,
                                                               p->hc_lnb + (size_t)k * C, p->hc_Wa + (size_t)k * C * n1, p->hc_Wb + (size_t)k * C, n, C);
        kernelCheck();
        coef_end();
        return;
    }
#endif
    if (pv && !hc_fuses_premix(c)) die("internal: the fused boundary needs the tensor-core HC kernels");
    if (c->mode == MODE_SHC || c->mode == MODE_DHC) {
        int dyn = c->mode == MODE_DHC, w = n * n1 + n + 2;
        if (dyn) {
            // the per-channel parameter grads reduce over all BT*n rows: many chunks keep the SMs busy
            const int DHC_CHUNKS = 256;
            int R = BT * n, chunk = (R + DHC_CHUNKS - 1) / DHC_CHUNKS;
            float *gbuf = (float *)dscratch(0, (size_t)R * (n + 2) * sizeof(float));
            DISPATCH_N(n, dhc_coeffs_backward_kernel, ceil_div(R, 4), 128, dHk, gbuf, dpre, dpost, dres, Hk, a->hcn_mean + o1, a->hcn_rstd + o1,
                                                   a->hc_ta + (size_t)k * BT * n1 * n, a->hc_tb + o1, p->hc_lnw + (size_t)k * C,
                                                   p->hc_Wa + (size_t)k * C * n1, p->hc_Wb + (size_t)k * C, p->hc_sa + k, p->hc_sb + k, R, C);
            kernelCheck();
            float *partial = (float *)dscratch(1, (size_t)DHC_CHUNKS * C * (n + 4) * sizeof(float));
            DISPATCH_N(n, dhc_param_partial_kernel, dim3(ceil_div(C, 128), DHC_CHUNKS), 128, partial, gbuf, Hk, a->hcn_mean + o1, a->hcn_rstd + o1,
                                                                                   p->hc_lnw + (size_t)k * C, p->hc_lnb + (size_t)k * C,
                                                                                   p->hc_Wa + (size_t)k * C * n1, p->hc_Wb + (size_t)k * C, R, n, C, chunk);
            kernelCheck();
            dhc_param_finish_kernel<<<ceil_div((size_t)C * (n + 4), 256), 256>>>(g->hc_Wa + (size_t)k * C * n1, g->hc_Wb + (size_t)k * C,
                                                                                 g->hc_lnw + (size_t)k * C, g->hc_lnb + (size_t)k * C,
                                                                                 partial, n, C, DHC_CHUNKS);
            kernelCheck();
        }
        float *rows = (float *)dscratch(2, (size_t)BT * w * sizeof(float));
        float *sums = (float *)dscratch(1, (size_t)w * sizeof(float) + 64);
        hc_small_grads_kernel<<<ceil_div(BT, 128), 128>>>(rows, dpre, dpost, dres, dyn ? a->hc_ta + (size_t)k * BT * n1 * n : NULL,
                                                          dyn ? a->hc_tb + o1 : NULL, BT, n);
        kernelCheck();
        cudaCheck(cudaMemset(sums, 0, w * sizeof(float)));
        colsum(sums, rows, BT, w);
        hc_small_grads_scatter_kernel<<<1, 128>>>(g->hc_A + (size_t)k * n * n1, g->hc_b + (size_t)k * n, dyn ? g->hc_sa + k : NULL,
                                                  dyn ? g->hc_sb + k : NULL, sums, n);
        kernelCheck();
    } else {
        int nC = n * C;
        float *kx = (float *)dscratch(1, (size_t)BT * sizeof(float));
        // slot 7: [rows | dp | sums]; rows and sums are read on the coefficient stream
        // (rows rounded up to 256 bytes: dp is read in 16-byte pieces, and BT (m + 3) need not be a multiple of 4)
        size_t nrows = ((size_t)BT * (m + 3) + 63) / 64 * 64, npx = ((size_t)BT * m * sizeof(floatX) + 255) / 256 * 256 / sizeof(float);
        float *rows = (float *)dscratch(7, (nrows + npx + m + 3) * sizeof(float));
        floatX *dpx = (floatX *)(rows + nrows);
        float *sums = rows + nrows + npx;
        // the Sinkhorn backward ran on the coefficient stream (hc_sinkhorn_backward): dres holds its g
        DISPATCH_N(n, mhc_coeffs_backward_kernel, ceil_div((size_t)BT * sk_group(n), 128), 128, dpx, kx, rows, dpre, dpost, ga->res,
                   a->pre + o1, a->post + o1, a->mhc_rms + (size_t)k * BT, a->mhc_z + (size_t)k * BT * m, p->mhc_bias + (size_t)k * m,
                   p->mhc_alpha + k * 3, BT, n, C, c->sinkhorn_iters, NULL, 2);
        const float one = 1.0f;
        const floatX *phix = px(model, P_MHC_PHI) + (size_t)k * nC * m;
#if !defined(ENABLE_FP32)
        if (hc_tensor_cores(C, m)) {   // dH += pre_i du + dp @ phi^T + kx H and dphi += vec(H)^T dp, one pass over H and dH
            if (pv) hc_boundary<false>(n, dHk, g->mhc_phi + (size_t)k * nC * m, 1, dpx, kx, NULL, phix, du, a->pre + o1, pv, BT, C);
            else mhc_dh<false>(n, dHk, g->mhc_phi + (size_t)k * nC * m, 1, Hk, dpx, kx, NULL, phix, du, a->pre + o1, BT, C);
        } else
#endif
        {
            // dphi += vec(H)^T @ dp (fp32 accumulate), then dH += dp @ phi^T + kx * H (the rms term)
            cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_T, m, nC, BT, &one, dpx, CUBLAS_X, m, Hk, CUBLAS_X, nC,
                                     &one, g->mhc_phi + (size_t)k * nC * m, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, nC, BT, m, &one, phix, CUBLAS_X, m, dpx, CUBLAS_X, m,
                                     &one, dHk, CUBLAS_X, nC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            mhc_rms_backward_kernel<<<dim3(BT, ceil_div(nC / X128, 128)), 128>>>(dHk, Hk, kx, nC);
            kernelCheck();
        }
        // bias and alpha gradients: off the dependency chain, on the coefficient stream (joined
        // before the next sublayer's coefficient backward rewrites slot 7)
        cudaStream_t s = coef_begin();
        cudaCheck(cudaMemsetAsync(sums, 0, (m + 3) * sizeof(float), s));
        colsum(sums, rows, BT, m + 3, s, 6);
        mhc_small_scatter_kernel<<<1, 128, 0, s>>>(g->mhc_bias + (size_t)k * m, g->mhc_alpha + k * 3, sums, m);
        kernelCheck();
        coef_end();
    }
}

void gpt_forward(GPTHC *model, const int *inputs, const int *targets, int B, int T) {
    const GPTHCConfig *c = &model->config;
    int V = c->vocab_size, Vp = c->padded_vocab_size, C = c->channels, n = c->n, K = 2 * c->num_layers;
    check_batch(c, inputs, targets, B, T);
    gpt_ensure_activations(model, B, T);
    model->last_B = B;
    model->last_T = T;
    size_t BT = (size_t)B * T;
    cudaCheck(cudaMemcpy(model->inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice));
    memcpy(model->host_inputs, inputs, BT * sizeof(int));
    if (targets != NULL) cudaCheck(cudaMemcpy(model->targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice));
    ActivationTensors *a = &model->acts;
#if !defined(ENABLE_FP32)
    if (c->mode == MODE_DHC && hc_tensor_cores(C, mhc_width(n))) {   // this step's projections for the tensor-core dhc kernels
        ProfScope prof(PROF_HC_COEF);
        ParameterTensors *p = &model->params;
        size_t per = (size_t)n * C * mhc_width(n);
        if (model->dhc_phi == NULL) {
            cudaCheck(cudaMalloc(&model->dhc_phi, (size_t)K * per * sizeof(floatX)));
            cudaCheck(cudaMalloc(&model->dhc_gc, (size_t)K * 2 * (n + 2) * sizeof(float)));
        }
        dhc_phi_kernel<<<dim3(ceil_div(per, 256), K), 256>>>(model->dhc_phi, p->hc_lnw, p->hc_Wa, p->hc_Wb, n, C);
        kernelCheck();
        dhc_gc_kernel<<<dim3(n + 2, K), 256>>>(model->dhc_gc, p->hc_lnw, p->hc_lnb, p->hc_Wa, p->hc_Wb, n, C);
        kernelCheck();
    }
    int fbt = c->mode != MODE_RESIDUAL && hc_fused_boundary(c) && fb_fits(n, C);   // the whole-row forward boundary
    if (fbt) {   // phi as fragments for it
        ProfScope prof(PROF_HC_COEF);
        int m = mhc_width(n);
        size_t per = (size_t)n * C * m;
        if (model->phif == NULL) cudaCheck(cudaMalloc(&model->phif, (size_t)K * per * sizeof(floatX)));
        phi_frag_kernel<<<dim3(ceil_div(per / 4, 256), K), 256>>>(model->phif, c->mode == MODE_DHC ? model->dhc_phi : px(model, P_MHC_PHI), n * C, m);
        kernelCheck();
    }
#else
    int fbt = 0;
#endif
    encoder_forward_kernel<<<ceil_div(BT, 4), 128>>>(a->H, model->inputs, px(model, P_WTE), px(model, P_WPE), BT, T, C, n);
    kernelCheck();
    for (int k = 0; k < K; k++) {
        floatX *Hk = hstate(model, k), *Hn = hstate(model, k + 1), *y = a->y + k * BT * C;
        if (c->mode == MODE_RESIDUAL) {
            sublayer_forward(model, k, Hk, B, T, k > 0);
            if (k + 1 < K) {   // H^{k+1} = H^k + y and the next sublayer's LayerNorm, one pass
                int k1 = k + 1, l1 = k1 / 2;
                layernorm_forward(a->ln + k1 * BT * C, a->ln_mean + k1 * BT, a->ln_rstd + k1 * BT, Hk,
                                  px(model, k1 % 2 ? P_LN2W : P_LN1W) + l1 * C, px(model, k1 % 2 ? P_LN2B : P_LN1B) + l1 * C, BT, C, y, Hn);
            } else {   // h = H^{K-1} + y and the final LayerNorm, one pass (H^K is not kept)
                layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, Hk, px(model, P_LNFW), px(model, P_LNFB), BT, C, y, a->hsum);
            }
        } else {
            int fb = hc_fused_boundary(c), ln_done = C <= 32 * PN_NV * X128, whole = fbt && k > 0;   // whole: step k - 1 did the pre-mix
            floatX *u = hc_ln_fused(C) ? NULL : a->u + k * BT * C;   // NULL: the backward recomputes u
            hc_coeffs_forward(model, k, Hk, BT, whole ? 2 : fb && k > 0);
            if (!whole) {
                ProfScope prof(PROF_HC);
                if (ln_done) {   // u (if stored) and the sublayer's LayerNorm in one pass
                    int l = k / 2;
                    DISPATCH_N(n, hc_premix_ln_kernel, ceil_div(BT, 8), 256, u, a->ln + k * BT * C, a->ln_mean + k * BT, a->ln_rstd + k * BT, Hk,
                               a->pre + k * BT * n, px(model, k % 2 ? P_LN2W : P_LN1W) + l * C, px(model, k % 2 ? P_LN2B : P_LN1B) + l * C,
                               (int)BT, C);
                } else {
                    DISPATCH_N(n, hc_premix_forward_kernel, ceil_div(BT, 4), 128, u, Hk, a->pre + k * BT * n, (int)BT, C);
                }
                kernelCheck();
            }
            sublayer_forward(model, k, u, B, T, ln_done);
            coef_join();   // res^k (mHC's Sinkhorn-Knopp, see hc_coeffs_forward)
            ProfScope prof(PROF_HC);
#if !defined(ENABLE_FP32)
            if (fb && k + 1 < K) {   // H^{k+1} and sublayer k + 1's projection in one pass
                size_t k1 = k + 1, m = mhc_width(n), dhc = c->mode == MODE_DHC;
                if (fbt) {   // and the gates, pre-mix and LayerNorm of k + 1 (hc_coeffs_forward then leaves mHC's Sinkhorn-Knopp)
                    ParameterTensors *p = &model->params;
                    size_t o1 = k1 * BT * n, l1 = k1 / 2;
                    FbArgs g = {};   // by name: the mhc-only and dhc-only fields stay NULL in the other mode
                    g.Hout = Hn, g.H = Hk, g.y = y, g.post = a->post + k * BT * n, g.res = a->res + k * BT * n * n;
                    g.phif = model->phif + k1 * (n * C / 16) * (m / 8) * 32;
                    g.pre = a->pre + o1, g.post1 = a->post + o1, g.z = a->mhc_z + k1 * BT * m;
                    if (dhc) {
                        g.res1 = a->res + k1 * BT * n * n, g.st0 = a->hcn_mean + o1, g.st1 = a->hcn_rstd + o1;
                        g.ta = a->hc_ta + o1 * (n + 1), g.tb = a->hc_tb + o1, g.gc = model->dhc_gc + k1 * 2 * (n + 2);
                        g.A = p->hc_A + k1 * n * (n + 1), g.b = p->hc_b + k1 * n, g.sa = p->hc_sa + k1, g.sb = p->hc_sb + k1;
                    } else {
                        g.st0 = a->mhc_rms + k1 * BT, g.bias = p->mhc_bias + k1 * m, g.alpha = p->mhc_alpha + k1 * 3;
                    }
                    g.u = hc_ln_fused(C) ? NULL : a->u + k1 * BT * C, g.ln = a->ln + k1 * BT * C;
                    g.ln_mean = a->ln_mean + k1 * BT, g.ln_rstd = a->ln_rstd + k1 * BT;
                    g.lnw = px(model, k1 % 2 ? P_LN2W : P_LN1W) + l1 * C, g.lnb = px(model, k1 % 2 ? P_LN2B : P_LN1B) + l1 * C;
                    g.BT = (int)BT, g.C = C;
                    hc_fwd_boundary(n, dhc, g);
                    continue;
                }
                float *pbuf = (float *)dscratch(0, BT * m * sizeof(float));   // where hc_coeffs_forward reads it
                const floatX *phi = (dhc ? model->dhc_phi : px(model, P_MHC_PHI)) + k1 * n * C * m;
                hc_postmix_proj(n, dhc, Hn, pbuf, dhc ? a->hcn_mean + k1 * BT * n : a->mhc_rms + k1 * BT, dhc ? a->hcn_rstd + k1 * BT * n : NULL,
                                Hk, y, a->post + k * BT * n, a->res + k * BT * n * n, phi, (int)BT, C);
                continue;
            }
#endif
            int last = k + 1 == K;   // the last sublayer: h = sum_i H^K_i straight from the post-mix (H^K is not kept)
            DISPATCH_N(n, hc_postmix_forward_kernel, ceil_div(BT, 4), 128, last ? a->hsum : Hn, Hk, y, a->post + k * BT * n,
                       a->res + k * BT * n * n, (int)BT, C, last);
            kernelCheck();
        }
    }
    if (c->mode != MODE_RESIDUAL) layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->hsum, px(model, P_LNFW), px(model, P_LNFB), BT, C);
    matmul_forward(a->logits, a->lnf, px(model, P_WTE), NULL, BT, C, Vp);
    if (targets != NULL) {
        ProfScope prof_cls(PROF_CLASSIFIER);
        classifier_forward_kernel<<<BT, 256>>>(a->losses, a->lse, model->grads_acts.logits, a->logits, model->targets, V, Vp);
        kernelCheck();
        cudaCheck(cudaMemcpy(model->host_losses, a->losses, BT * sizeof(float), cudaMemcpyDeviceToHost));
        double s = 0.0;
        for (size_t i = 0; i < BT; i++) s += model->host_losses[i];
        model->mean_loss = (float)(s / BT);
    } else {
        model->mean_loss = -1.0f;
    }
}

void gpt_zero_grad(GPTHC *model) {
    if (model->grads_memory != NULL) cudaCheck(cudaMemset(model->grads_memory, 0, model->padded_params * sizeof(float)));
    model->grads_fresh = 1;
}

static void reduce_layer_grads(GPTHC *model, int l);
static int overlap_on(void);

// last: the last micro-batch of the step; in a run of several GPUs its gradients are summed over
// the ranks while it runs (layer by layer; gpt_sync_grads adds the rest and waits)
void gpt_backward(GPTHC *model, float loss_scale, int last) {
    if (model->mean_loss == -1.0f) die("internal: backward without a forward with targets");
    const GPTHCConfig *c = &model->config;
    if (model->grads_memory == NULL) {
        cudaCheck(cudaMalloc(&model->grads_memory, model->padded_params * sizeof(float)));
        cudaCheck(cudaMemset(model->grads_memory, 0, model->padded_params * sizeof(float)));
        point_parameters(&model->grads, model->grads_memory, model->param_sizes);
        model->grads_fresh = 1;
    }
    int B = model->last_B, T = model->last_T;
    int Vp = c->padded_vocab_size, C = c->channels, n = c->n, K = 2 * c->num_layers;
    size_t BT = (size_t)B * T, S = BT * n * C;
    ParameterTensors *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    // every gradient buffer is written before it is read: dlogits (unscaled) by the forward, dh (every
    // dH^K_i) by the final LayerNorm backward, each dH^k first by the post-mix backward (with the fused boundary, by
    // step k + 1's kernel; residual: the LayerNorm backward), then accumulated
    // wte gets two terms per micro-batch (classifier, embedding); they are summed before they
    // meet the accumulated gradient, so accumulating micro-batches on one GPU adds the same
    // per-batch values as summing them over GPUs: the result does not depend on the GPU count
    float *dwte = g->wte;
    if (!model->grads_fresh) {
        if (model->wte_acc == NULL) cudaCheck(cudaMalloc(&model->wte_acc, (size_t)Vp * C * sizeof(float)));
        dwte = model->wte_acc;
    }
    matmul_backward(ga->lnf, dwte, NULL, ga->logits, a->lnf, px(model, P_WTE), BT, C, Vp, NULL, 0.0f, loss_scale / (float)BT);
    // dh: every stream's gradient dH^K_i (h = sum_i H^K_i); the last sublayer reads it as such
    layernorm_backward(ga->hsum, g->lnfw, g->lnfb, ga->lnf, a->hsum, px(model, P_LNFW), a->lnf_mean, a->lnf_rstd, BT, C, NULL, 1);
    int Lr = gpt_recompute(model);
    // Side-stream hazards: sublayer j's weight gradients read its dy and its dfch or dqkv. In the HC
    // modes dy alternates between two buffers and attention and MLP sublayers alternate, so sublayer
    // k first rewrites what sublayer k + 2 read; in residual mode dy is the state gradient dH^{j+1},
    // whose slot sublayer k's LayerNorm backward rewrites at k = j - 1.
    // With the fused boundary (hc_fused_boundary), step k also runs sublayer k - 1's post-mix
    // backward, so dy^{k-1} is written at step k and step k reads H^{k-1}.
    int hc = c->mode != MODE_RESIDUAL, fused = hc && hc_fused_boundary(c), rc_block = -1;
    for (int k = K - 1; k >= 0; k--) {
        if (!hc && k < K - 1) side_wait((k + 1) % 2);
        if (hc && !fused && k < K - 2) side_wait(k % 2);
        for (int q = k; q >= k - fused && q >= 0 && Lr > 1; q--) {   // the states this step reads
            int bq = q / Lr;
            if (q % Lr == 0 || bq == rc_block) continue;   // stored, or its block is recomputed
            ProfScope prof(PROF_HC);   // recompute the inner states of block bq (the shared slots)
            for (int j = bq * Lr; j < min(bq * Lr + Lr - 1, K - 1); j++)
                DISPATCH_N(n, hc_postmix_forward_kernel, ceil_div(BT, 4), 128, hstate(model, j + 1), hstate(model, j), a->y + j * BT * C,
                           a->post + j * BT * n, a->res + j * BT * n * n, (int)BT, C);
            rc_block = bq;
        }
        // the state gradients alternate between two buffers: dH^k in slot k % 2
        floatX *Hk = hstate(model, k), *dHk = ga->H + (k % 2) * S, *dHn = ga->H + ((k + 1) % 2) * S;
        if (c->mode == MODE_RESIDUAL) {
            const floatX *dHK = k == K - 1 ? ga->hsum : dHn;   // dH^K = dh
            sublayer_backward(model, k, dHk, dHK, Hk, B, T, dHK);   // dH^k = dH^{k+1} + du
        } else {
            int lnf = hc_ln_fused(C), l = k / 2;
            floatX *u = lnf ? NULL : a->u + k * BT * C, *du = ga->u, *dy = ga->y + (k % 2) * BT * C;   // two dy buffers: see side_wait
            size_t o1 = k * BT * n, o2 = k * BT * n * n;
            if (!fused || k == K - 1) {   // else done by step k + 1
                ProfScope prof(PROF_HC);
                int last = k == K - 1;   // dH^K_i = dh for every i: one row, read n times
                DISPATCH_N(n, hc_postmix_backward_kernel, ceil_div(BT, 4), 128, dHk, dy, ga->post, ga->res, last ? ga->hsum : dHn, Hk,
                           a->y + k * BT * C, a->post + o1, a->res + o2, (int)BT, C, last);
                kernelCheck();
                hc_sinkhorn_backward(model, k, (int)BT);
            }
            sublayer_backward(model, k, du, dy, u, B, T);   // writes du, or leaves the LayerNorm backward to the pre-mix's
            floatX *dHp = hc_fuses_premix(c) ? NULL : dHk;   // the tensor-core dH pass adds pre_i du itself
            if (lnf) {
                hc_ln_premix_backward(n, du, ga->pre, dHp, (k % 2 ? g->ln2w : g->ln1w) + l * C, (k % 2 ? g->ln2b : g->ln1b) + l * C, ga->ln, Hk,
                                      a->pre + o1, px(model, k % 2 ? P_LN2W : P_LN1W) + l * C, a->ln_mean + k * BT, a->ln_rstd + k * BT,
                                      (int)BT, C);
            } else {
                ProfScope prof(PROF_HC);
                DISPATCH_N(n, hc_premix_backward_kernel, ceil_div(BT, 4), 128, dHp, ga->pre, du, Hk, a->pre + o1, (int)BT, C);
                kernelCheck();
            }
            if (fused && k > 0) {   // with sublayer k - 1's post-mix backward; its dy buffer was read by sublayer k + 1's weight gradients
                size_t j = k - 1;
                HcPrev pv = {dHn, ga->y + (j % 2) * BT * C, ga->post, ga->res, hstate(model, (int)j), a->y + j * BT * C, a->post + j * BT * n,
                             a->res + j * BT * n * n};
                if (k + 1 < K) side_wait(j % 2);
                hc_coeffs_backward(model, k, dHk, Hk, du, BT, &pv);
                hc_sinkhorn_backward(model, k - 1, (int)BT);   // dres^{k-1} came with the boundary kernel
            } else {
                hc_coeffs_backward(model, k, dHk, Hk, du, BT);
            }
        }
        side_mark(k % 2);   // everything sublayer k handed to the side stream
        if (last && g_multi.world > 1 && k % 2 == 0 && overlap_on()) {   // layer k/2 is done
            side_wait(k % 2);
            coef_join();   // its dphi sums
            reduce_layer_grads(model, k / 2);
        }
    }
    side_wait(0);
    coef_join();
    // bucket the positions by token id (counting sort, stable; distinct tokens in order of first
    // appearance), then cut the buckets into chunks of at most WTE_CHUNK positions
    int *cnt = model->bucket_count, *hb = model->host_buckets, nu = 0;
    int *pos = hb, *chunks = hb + BT, *multi = chunks + 4 * BT;
    int *toks = model->host_toks, *offs = model->host_offs;
    for (size_t i = 0; i < BT; i++) cnt[model->host_inputs[i]]++;
    for (size_t i = 0; i < BT; i++) {
        int t = model->host_inputs[i];
        if (cnt[t] > 0) { toks[nu] = t; offs[nu + 1] = cnt[t]; cnt[t] = -(nu + 1); nu++; }
    }
    offs[0] = 0;
    for (int u = 0; u < nu; u++) offs[u + 1] += offs[u];
    for (int u = 0; u < nu; u++) cnt[toks[u]] = offs[u];   // next free slot of each bucket
    for (size_t i = 0; i < BT; i++) pos[cnt[model->host_inputs[i]]++] = (int)i;
    for (int u = 0; u < nu; u++) cnt[toks[u]] = 0;
    int nchunks = 0, nmulti = 0, nslots = 0;
    for (int u = 0; u < nu; u++) {
        int len = offs[u + 1] - offs[u], k = (len + g_wte_chunk - 1) / g_wte_chunk;
        if (k > 1) { multi[3 * nmulti] = toks[u]; multi[3 * nmulti + 1] = nslots; multi[3 * nmulti + 2] = k; nmulti++; }
        for (int q = 0; q < k; q++, nchunks++) {
            int *ch = chunks + 4 * nchunks;
            ch[0] = toks[u];
            ch[1] = offs[u] + q * g_wte_chunk;
            ch[2] = min(offs[u + 1], ch[1] + g_wte_chunk);
            ch[3] = k > 1 ? nslots++ : -1;
        }
    }
    cudaCheck(cudaMemcpy(model->buckets, hb, WTE_BUCKET_INTS(BT) * sizeof(int), cudaMemcpyHostToDevice));
    // dx0 = sum_i dH^0_i, once (into the free hsum gradient): the wte gather and the wpe sum then
    // read one row per position instead of n (1.8 -> 0.6 ms per d12 step at n = 4)
    const floatX *dx0 = ga->H;
    int n0 = n;
    if (n > 1) {
        stream_sum_kernel<<<ceil_div(BT, 4), 128>>>(ga->hsum, ga->H, BT, n, C);
        kernelCheck();
        dx0 = ga->hsum;
        n0 = 1;
    }
    float *partial = (float *)dscratch(0, ((size_t)nslots + 1) * C * sizeof(float));
    wte_backward_kernel<<<dim3(nchunks, ceil_div(C, 128)), 128>>>(dwte, partial, dx0, model->buckets + BT, model->buckets, n0, C);
    if (nmulti > 0)
        wte_backward_finish_kernel<<<dim3(nmulti, ceil_div(C, 128)), 128>>>(dwte, partial, model->buckets + 5 * BT, C);
    if (dwte != g->wte) {
        accumulate_kernel<<<ceil_div((size_t)Vp * C, 256), 256>>>(g->wte, dwte, (size_t)Vp * C);
        kernelCheck();
    }
    model->grads_fresh = 0;
    wpe_backward_kernel<<<dim3(T, ceil_div(C, 128)), 128>>>(g->wpe, dx0, B, T, n0, C);
    kernelCheck();
}

// enqueue on NCCL's stream the sum over the ranks of grads[a, b): all-reduced, or with ZeRO-1
// reduced to the rank whose shard holds each part
static void reduce_grad_range(GPTHC *model, size_t a, size_t b) {
    float *g = model->grads_memory;
    if (!g_multi.zero) {
        if (a < b) ncclCheck(ncclAllReduce(g + a, g + a, b - a, ncclFloat, ncclSum, g_multi.comm, g_multi.stream));
        return;
    }
    size_t sn = model->shard_n;
    for (int r = 0; r < g_multi.world; r++) {
        size_t x = a > r * sn ? a : r * sn, y = b < (r + 1) * sn ? b : (r + 1) * sn;
        if (x < y) ncclCheck(ncclReduce(g + x, g + x, y - x, ncclFloat, ncclSum, r, g_multi.comm, g_multi.stream));
    }
}

static int overlap_on(void) { return g_multi.overlap; }

static int per_layer_tensor(int t) { return (t >= P_LN1W && t <= P_FCPROJB) || t >= P_HC_A; }

// layer l's slices of the per-layer tensors (blocks: one slice per layer; HC/mHC: one per
// sublayer, and layer l's two are adjacent), once the backward has finished them
static void reduce_layer_grads(GPTHC *model, int l) {
    int L = model->config.num_layers;
    cudaCheck(cudaEventRecord(g_multi.ev, 0));
    cudaCheck(cudaStreamWaitEvent(g_multi.stream, g_multi.ev, 0));
    ncclCheck(ncclGroupStart());
    size_t off = 0;
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        size_t sz = model->param_sizes[t], slice = sz / L;
        if (sz > 0 && per_layer_tensor(t)) reduce_grad_range(model, off + l * slice, off + (l + 1) * slice);
        off += sz;
    }
    ncclCheck(ncclGroupEnd());
    g_multi.overlapped = 1;
}

// sum the gradients over the ranks: what the backward has not handed to NCCL yet (everything,
// or the tensors outside the layers), then the main stream waits for NCCL. With ZeRO-1 only this
// rank's shard ends up summed (the rest of grads is stale).
static void gpt_sync_grads(GPTHC *model) {
    if (g_multi.world == 1) return;
    ProfScope prof(PROF_OPTIMIZER);
    cudaCheck(cudaEventRecord(g_multi.ev, 0));
    cudaCheck(cudaStreamWaitEvent(g_multi.stream, g_multi.ev, 0));
    ncclCheck(ncclGroupStart());
    size_t off = 0;
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        if (!g_multi.overlapped || !per_layer_tensor(t)) reduce_grad_range(model, off, off + model->param_sizes[t]);
        off += model->param_sizes[t];
    }
    ncclCheck(ncclGroupEnd());
    cudaCheck(cudaEventRecord(g_multi.ev, g_multi.stream));
    cudaCheck(cudaStreamWaitEvent(0, g_multi.ev, 0));
    g_multi.overlapped = 0;
}

// add n host values over the ranks, in place
static void multi_sum(double *x, int n) {
    if (g_multi.world == 1) return;
    if (n > 64) die("internal: multi_sum of %d values", n);
    cudaCheck(cudaMemcpy(g_multi.dsum, x, n * sizeof(double), cudaMemcpyHostToDevice));
    ncclCheck(ncclAllReduce(g_multi.dsum, g_multi.dsum, n, ncclDouble, ncclSum, g_multi.comm, 0));
    cudaCheck(cudaMemcpy(x, g_multi.dsum, n * sizeof(double), cudaMemcpyDeviceToHost));
}

static void gpt_multi_finish(void) {
    if (g_multi.world > 1) {
        cudaCheck(cudaDeviceSynchronize());
        ncclCheck(ncclCommDestroy(g_multi.comm));
        cudaFree(g_multi.dsum);
        cudaStreamDestroy(g_multi.stream);
        cudaEventDestroy(g_multi.ev);
    }
#ifdef USE_MPI
    if (g_multi.mpi) MPI_Finalize();
#endif
}

// global L2 norm of the (summed) gradient: fixed chunks, each rank the chunks of its shard, the
// partials gathered and added on the host in chunk order, so it is the same for any rank count
float gpt_grad_norm(GPTHC *model) {
    ProfScope prof(PROF_OPTIMIZER);
    size_t nchunks = model->padded_params / NORM_CHUNK, c0 = model->shard_lo / NORM_CHUNK, cn = model->shard_n / NORM_CHUNK;
    double *partial = (double *)dscratch(3, nchunks * sizeof(double));
    sumsq_partial_kernel<<<cn, 1024>>>(partial + c0, model->grads_memory + model->shard_lo);
    kernelCheck();
    if (g_multi.zero) ncclCheck(ncclAllGather(partial + c0, partial, cn, ncclDouble, g_multi.comm, 0));
    double *h = (double *)mallocCheck(nchunks * sizeof(double)), s = 0.0;
    cudaCheck(cudaMemcpy(h, partial, nchunks * sizeof(double), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < nchunks; i++) s += h[i];
    free(h);
    return (float)sqrt(s);
}

// AdamW on this rank's range [shard_lo, shard_lo + shard_n) of every tensor; with ZeRO-1 the
// moments hold that range only, and the updated floatX weights are all-gathered
void gpt_update(GPTHC *model, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t) {
    size_t lo = model->shard_lo, hi = lo + model->shard_n;
    if (model->m_memory == NULL) {
        cudaCheck(cudaMalloc(&model->m_memory, model->shard_n * sizeof(float)));
        cudaCheck(cudaMalloc(&model->v_memory, model->shard_n * sizeof(float)));
        cudaCheck(cudaMemset(model->m_memory, 0, model->shard_n * sizeof(float)));
        cudaCheck(cudaMemset(model->v_memory, 0, model->shard_n * sizeof(float)));
    }
    ProfScope prof(PROF_OPTIMIZER);
    model->moments_ready = 1;
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAMETER_TENSORS; ti++) {
        size_t a = off > lo ? off : lo, b = off + model->param_sizes[ti] < hi ? off + model->param_sizes[ti] : hi;
        if (a < b) {
            float wd = param_decays(ti) ? weight_decay : 0.0f;
            adamw_kernel<<<ceil_div(b - a, 256), 256>>>(model->params_memory + a, model->paramsx_memory + a, model->grads_memory + a,
                                                        model->m_memory + (a - lo), model->v_memory + (a - lo), b - a, lr, beta1, beta2,
                                                        bc1, bc2, eps, wd, grad_scale);
            kernelCheck();
        }
        off += model->param_sizes[ti];
    }
    if (g_multi.zero) {   // FP32 builds gather the master weights themselves (paramsx == params)
        floatX *x = model->paramsx_memory;
        ncclCheck(ncclAllGather(x + lo, x, model->shard_n * sizeof(floatX), ncclUint8, g_multi.comm, 0));
        if ((void *)x != (void *)model->params_memory) {
            // the HC/mHC coefficient kernels read their tensors' fp32 master weights (the last
            // tensors, from P_HC_A on): each owner broadcasts its part of that range
            float *pm = model->params_memory;
            size_t h0 = 0, h1 = model->num_parameters, sn = model->shard_n;
            for (int i = 0; i < P_HC_A; i++) h0 += model->param_sizes[i];
            ncclCheck(ncclGroupStart());
            for (int r = 0; r < g_multi.world; r++) {
                size_t a = h0 > r * sn ? h0 : r * sn, b = h1 < (r + 1) * sn ? h1 : (r + 1) * sn;
                if (a < b) ncclCheck(ncclBroadcast(pm + a, pm + a, b - a, ncclFloat, r, g_multi.comm, 0));
            }
            ncclCheck(ncclGroupEnd());
        }
    }
    cudaCheck(cudaDeviceSynchronize());   // so the host's step timer covers the whole step
}

// diagnostics (SPEC.md section 4) of the last forward's first BT tokens (llmc/model_common.h)
void gpt_diagnostics(GPTHC *model, int BT, Diagnostics *d) {
    const GPTHCConfig *c = &model->config;
    size_t K = 2 * c->num_layers, n = c->n, ld = (size_t)model->last_B * model->last_T;   // (K, last B*T, ...)
    if (c->mode == MODE_RESIDUAL) { compute_diagnostics(d, NULL, NULL, NULL, BT, ld); return; }
    model->host_res = (float *)realloc(model->host_res, K * ld * (n * n + 2 * n) * sizeof(float));
    if (!model->host_res) die("out of host memory");
    float *pre = model->host_res, *post = pre + K * ld * n, *res = post + K * ld * n;
    cudaCheck(cudaMemcpy(pre, model->acts.pre, K * ld * n * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(post, model->acts.post, K * ld * n * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(res, model->acts.res, K * ld * n * n * sizeof(float), cudaMemcpyDeviceToHost));
    compute_diagnostics(d, pre, post, res, BT, ld);
}

// n floatX values from the device as host floats (caller frees)
static float *floatx_to_host(const floatX *d, size_t n) {
    floatX *tmp = (floatX *)mallocCheck(n * sizeof(floatX));
    float *out = (float *)mallocCheck(n * sizeof(float));
    cudaCheck(cudaMemcpy(tmp, d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) out[i] = (float)tmp[i];
    free(tmp);
    return out;
}

void gpt_sample(GPTHC *model, const Tokenizer *tok, uint64_t *rng, int gen_tokens) {
    int T = model->seq_len, Vp = model->config.padded_vocab_size, V = model->config.vocab_size;
    if (gen_tokens > T) gen_tokens = T;
    int *toks = (int *)mallocCheck((size_t)T * sizeof(int));
    int eot = tok->init_ok ? tok->eot_token : 50256;
    if (eot >= V) eot = 0;
    toks[0] = eot;
    printf("generating:\n---\n");
    attn_set_sampling(1);
    for (int t = 1; t < gen_tokens; t++) {
        gpt_forward(model, toks, NULL, 1, t);
        float *probs = floatx_to_host(model->acts.logits + (size_t)(t - 1) * Vp, Vp), mx = -FLT_MAX;
        double s = 0.0;
        for (int i = 0; i < V; i++) mx = fmaxf(mx, probs[i]);
        for (int i = 0; i < V; i++) { probs[i] = expf(probs[i] - mx); s += probs[i]; }
        for (int i = 0; i < V; i++) probs[i] /= (float)s;
        toks[t] = sample_mult(probs, V, rng_uniform(rng));
        free(probs);
        tokenizer_print(tok, (uint32_t)toks[t]);
        fflush(stdout);
    }
    printf("\n---\n");
    attn_set_sampling(0);
    free(toks);
}

// collective under ZeRO-1: the fp32 master weights and moments are gathered from the shards
// (the gradient buffer, spent after the update, holds the gathered moments on the way)
void gpt_host_state(GPTHC *model, const float **params, const float **m, const float **v) {
    size_t P = model->num_parameters, lo = model->shard_lo, sn = model->shard_n;
    float *pm = model->params_memory;
    if (g_multi.zero && (void *)model->paramsx_memory != (void *)pm)
        ncclCheck(ncclAllGather(pm + lo, pm, sn, ncclFloat, g_multi.comm, 0));
    cudaCheck(cudaMemcpy(model->host_params, pm, P * sizeof(float), cudaMemcpyDeviceToHost));
    *params = model->host_params;
    *m = *v = NULL;
    if (model->moments_ready) {
        if (!model->host_m) { model->host_m = (float *)mallocCheck(P * sizeof(float)); model->host_v = (float *)mallocCheck(P * sizeof(float)); }
        float *src[2] = {model->m_memory, model->v_memory}, *dst[2] = {model->host_m, model->host_v};
        for (int i = 0; i < 2; i++) {
            if (g_multi.zero) {
                if (model->grads_memory == NULL) die("internal: gathering moments without a gradient buffer");
                ncclCheck(ncclAllGather(src[i], model->grads_memory, sn, ncclFloat, g_multi.comm, 0));
                cudaCheck(cudaMemcpy(dst[i], model->grads_memory, P * sizeof(float), cudaMemcpyDeviceToHost));
            } else {
                cudaCheck(cudaMemcpy(dst[i], src[i], P * sizeof(float), cudaMemcpyDeviceToHost));
            }
        }
        *m = model->host_m;
        *v = model->host_v;
    }
}

// full-length host moments (a checkpoint's); each rank keeps its range
void gpt_set_moments(GPTHC *model, const float *m, const float *v) {
    size_t P = model->num_parameters, lo = model->shard_lo, sn = model->shard_n;
    if (model->m_memory == NULL) {
        cudaCheck(cudaMalloc(&model->m_memory, sn * sizeof(float)));
        cudaCheck(cudaMalloc(&model->v_memory, sn * sizeof(float)));
    }
    cudaCheck(cudaMemset(model->m_memory, 0, sn * sizeof(float)));
    cudaCheck(cudaMemset(model->v_memory, 0, sn * sizeof(float)));
    if (lo < P) {
        size_t cnt = lo + sn <= P ? sn : P - lo;
        cudaCheck(cudaMemcpy(model->m_memory, m + lo, cnt * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(model->v_memory, v + lo, cnt * sizeof(float), cudaMemcpyHostToDevice));
    }
    model->moments_ready = 1;
}

void gpt_free(GPTHC *model) {
    cudaFree(model->params_memory);
    if ((void *)model->paramsx_memory != (void *)model->params_memory) cudaFree(model->paramsx_memory);
    cudaFree(model->dhc_phi);
    cudaFree(model->dhc_gc);
    cudaFree(model->phif);
    cudaFree(model->grads_memory);
    cudaFree(model->wte_acc);
    cudaFree(model->m_memory);
    cudaFree(model->v_memory);
    cudaFree(model->actsx_memory);
    cudaFree(model->actsf_memory);
    cudaFree(model->gactsx_memory);
    cudaFree(model->gactsf_memory);
    cudaFree(model->inputs);
    cudaFree(model->targets);
    free(model->host_params);
    free(model->host_m);
    free(model->host_v);
    free(model->host_losses);
    free(model->host_res);
    free(model->host_inputs);
    free(model->bucket_count);
    free(model->host_toks);
    free(model->host_offs);
    free(model->host_buckets);
    cudaFree(model->buckets);
}

// after training: peak GPU memory and, with GPT_HC_PROFILE=1, the time split per step
static void gpt_print_report(GPTHC *model, int steps, double total_ms) {
    printf("peak GPU memory in use: %.0f MiB\n", g_peak_used / 1048576.0);
    if (prof_on() && steps > 0) {
        double known = 0.0;
        printf("time split per step (GPT_HC_PROFILE=1, synchronized scopes):\n");
        for (int i = 0; i < PROF_N; i++) {
            printf("  %-18s %8.2f ms  %5.1f%%\n", PROF_NAMES[i], g_prof_ms[i] / steps, 100.0 * g_prof_ms[i] / total_ms);
            known += g_prof_ms[i];
        }
        printf("  %-18s %8.2f ms  %5.1f%%\n", "other kernels", (total_ms - known) / steps, 100.0 * (total_ms - known) / total_ms);
    }
}

static void gpt_step_done(GPTHC *model, int timed) {
    sample_memory();
    if (!timed) for (int i = 0; i < PROF_N; i++) g_prof_ms[i] = 0.0;   // the warm-up step is not counted
}

static const char *gpt_device_description(void) {
    static char buf[320];
    cudaDeviceProp prop;
    gpt_init_device();
    int dev = 0;
    cudaCheck(cudaGetDevice(&dev));   // this rank's GPU
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    snprintf(buf, sizeof buf, "%s, %s", prop.name, PRECISION_NAME);
    return buf;
}

#ifndef TESTING
#define TRAINER_NAME "train_gpt_hcu"
#include "llmc/train_main.h"
#endif
