/*
Attention variants side by side (issue 4), correctness first, then timing with CUDA events:
  1. cuBLAS batched matmuls around a materialized causal softmax (llm.c's non-cuDNN path):
     attention_forward_cublas/attention_backward_cublas of train_gpt_hc.cu (its FP32 path);
  2. fused FlashAttention-2-style kernels on bf16 tensor cores through WMMA (below): no T x T
     matrices in memory, dK/dV and dQ in separate kernels (deterministic, no atomics);
  3. the same algorithm with mma.sync m16n8k16 and register-resident accumulators:
     attention_forward_flash/attention_backward_flash of train_gpt_hc.cu (its BF16 path), 4 warps
     (64 rows) per block;
  4. as 3 with 8 warps (128 rows) per block: each K/V (Q/dO) tile loaded to shared memory
     serves twice the rows;
  5. cuDNN's fused SDPA through the backend graph API: attention_forward_cudnn/
     attention_backward_cudnn of train_gpt_hc.cu (its BF16 default).
Variants 2-5 are checked against variant 1 (itself checked against PyTorch and the CPU
trainer by make test-cuda) on fresh random inputs: output, dq, dk, dv, at the timed size and at a
ragged T (not a multiple of 64).
    make dev/cuda/bench_attention && ./dev/cuda/bench_attention [B T NH]   (default 16 1024 12)
Results on an H100 in dev/NOTES.md. WMMA's accumulator layout is opaque, so variant 2
round-trips S and O through shared memory for every key tile; variant 3 keeps them in registers.
*/
#define TESTING
#include "../../train_gpt_hc.cu"
#include <mma.h>

#if defined(ENABLE_FP32)
#error "bench_attention compares bf16 kernels: build without ENABLE_FP32"
#endif

// ----------------------------------------------------------------------------
// variant 2: fused causal attention (FlashAttention-2 style) for bf16, head size 64, T % 64 == 0:
// tensor-core 16x16x16 WMMA tiles, scores and probabilities never leave shared memory. Reads
// q, k, v straight from the (B, T, 3C) qkv tensor and writes (B, T, C), so no permutes.
// The backward recomputes P from the row logsumexp; dK/dV and dQ are separate kernels so that
// every gradient element has exactly one writer (deterministic, no atomics).
#define WM_HS 64      // head size
#define WM_TILE 64    // queries per block (forward, dQ) / keys per block (dK, dV)
#define WM_LD 72      // bf16 row stride in shared memory (64 + 8: avoids bank conflicts, keeps 32 B alignment)
using namespace nvcuda;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragBr;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> FragBc;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// 64 rows x 64 bf16 from a row-major source with row stride ld_src into smem (row stride WM_LD)
__device__ __forceinline__ void wm_load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *src, size_t ld_src) {
    for (int i = threadIdx.x; i < WM_TILE * 8; i += blockDim.x) {
        int r = i / 8, c = (i % 8) * 8;
        *reinterpret_cast<int4 *>(dst + r * WM_LD + c) = *reinterpret_cast<const int4 *>(src + (size_t)r * ld_src + c);
    }
}

// the K and V tiles of key tile kt (one (b, h) slice of qkv at base)
__device__ __forceinline__ void wm_load_kv(__nv_bfloat16 *Ks, __nv_bfloat16 *Vs, const __nv_bfloat16 *base, int kt, int C, int C3) {
    wm_load_tile(Ks, base + (size_t)kt * WM_TILE * C3 + C, C3);
    wm_load_tile(Vs, base + (size_t)kt * WM_TILE * C3 + 2 * C, C3);
}

// out (16 x 64, fp32, row stride 64) = A (16 x 64 bf16, row stride WM_LD) @ B, B given as
// 64 x 64 bf16 with row stride WM_LD, used transposed (col_major view) or as is (row_major)
template <bool B_TRANSPOSED>
__device__ __forceinline__ void wm_mm_16x64(float *out, const __nv_bfloat16 *A, const __nv_bfloat16 *B, bool accumulate) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        FragC c;
        if (accumulate) wmma::load_matrix_sync(c, out + j * 16, 64, wmma::mem_row_major);
        else wmma::fill_fragment(c, 0.0f);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            FragA a;
            wmma::load_matrix_sync(a, A + kk * 16, WM_LD);
            if (B_TRANSPOSED) {   // element (k, n) at B[n * WM_LD + k]
                FragBc b;
                wmma::load_matrix_sync(b, B + j * 16 * WM_LD + kk * 16, WM_LD);
                wmma::mma_sync(c, a, b, c);
            } else {              // element (k, n) at B[k * WM_LD + n]
                FragBr b;
                wmma::load_matrix_sync(b, B + kk * 16 * WM_LD + j * 16, WM_LD);
                wmma::mma_sync(c, a, b, c);
            }
        }
        wmma::store_matrix_sync(out + j * 16, c, 64, wmma::mem_row_major);
    }
}

#define WM_FWD_SMEM (3 * WM_TILE * WM_LD * 2 + 4 * 16 * 64 * 4 * 2 + 4 * 16 * WM_LD * 2)
__global__ void __launch_bounds__(128) wmma_attention_forward_kernel(floatX *out, float *lse, const floatX *qkv, int T, int NH, float scale) {
    extern __shared__ __align__(128) unsigned char wm_smem[];
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)wm_smem, *Ks = Qs + WM_TILE * WM_LD, *Vs = Ks + WM_TILE * WM_LD;
    float *Ss = (float *)(Vs + WM_TILE * WM_LD), *Os = Ss + 4 * 16 * 64;
    __nv_bfloat16 *Ps = (__nv_bfloat16 *)(Os + 4 * 16 * 64);
    int qt = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * WM_HS, C3 = 3 * C;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * WM_TILE;
    const floatX *base = qkv + (size_t)b * T * C3 + h * WM_HS;
    wm_load_tile(Qs, base + (size_t)q0 * C3, C3);
    float *S = Ss + w * 16 * 64, *O = Os + w * 16 * 64;
    __nv_bfloat16 *P = Ps + w * 16 * WM_LD;
    for (int i = lane; i < 16 * 64; i += 32) O[i] = 0.0f;
    // two lanes per row: lane/2 is the row, lane%2 the half of the 64 columns
    int r = lane / 2, half = lane % 2, qrow = q0 + w * 16 + r;
    float m = -FLT_MAX, l = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads();
        wm_load_kv(Ks, Vs, base, kt, C, C3);
        __syncthreads();
        wm_mm_16x64<true>(S, Qs + w * 16 * WM_LD, Ks, false);   // S = Q K^T
        __syncwarp();
        float mx = -FLT_MAX;
        for (int c = half * 32; c < half * 32 + 32; c++)
            if (kt * WM_TILE + c <= qrow) mx = fmaxf(mx, S[r * 64 + c] * scale);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        float mnew = fmaxf(m, mx), corr = m == -FLT_MAX ? 0.0f : expf(m - mnew), sum = 0.0f;
        for (int c = half * 32; c < half * 32 + 32; c++) {
            float pv = kt * WM_TILE + c <= qrow ? expf(S[r * 64 + c] * scale - mnew) : 0.0f;
            sum += pv;
            P[r * WM_LD + c] = __float2bfloat16(pv);
            O[r * 64 + c] *= corr;
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        l = l * corr + sum;
        m = mnew;
        __syncwarp();
        wm_mm_16x64<false>(O, P, Vs, true);                        // O += P V
        __syncwarp();
    }
    floatX *o = out + ((size_t)b * T + qrow) * C + h * WM_HS;
    float inv = 1.0f / l;
    for (int c = half * 32; c < half * 32 + 32; c++) o[c] = tox(O[r * 64 + c] * inv);
    if (half == 0) lse[(size_t)bh * T + qrow] = m + logf(l);
}

// D[row] = sum_d dO[row][d] O[row][d], per (b, h, t); one warp per row
__global__ void wmma_attention_rowdot_kernel(float *D, const floatX *dout, const floatX *out, int BT, int T, int NH) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= BT * NH) return;
    int bt = row / NH, h = row % NH, C = NH * WM_HS;
    const floatX *d = dout + (size_t)bt * C + h * WM_HS, *o = out + (size_t)bt * C + h * WM_HS;
    float s = tof(d[lane]) * tof(o[lane]) + tof(d[lane + 32]) * tof(o[lane + 32]);
    s = warp_sum(s);
    int b = bt / T, t = bt % T;
    if (lane == 0) D[((size_t)b * NH + h) * T + t] = s;
}

// dK, dV for 64 keys of one (b, h): loop over the query tiles at or after the key tile
#define WM_BWD_SMEM (4 * WM_TILE * WM_LD * 2 + 4 * 16 * 64 * 4 * 3 + 4 * 16 * WM_LD * 2 * 2 + 2 * WM_TILE * 4)
__global__ void __launch_bounds__(128) wmma_attention_backward_kv_kernel(floatX *dqkv, const floatX *qkv, const floatX *dout,
                                                                         const float *lse, const float *D, int T, int NH, float scale) {
    extern __shared__ __align__(128) unsigned char wm_smem[];
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)wm_smem, *dOs = Qs + WM_TILE * WM_LD, *Ks = dOs + WM_TILE * WM_LD;
    __nv_bfloat16 *Vs = Ks + WM_TILE * WM_LD;
    float *Sb = (float *)(Vs + WM_TILE * WM_LD), *dK = Sb + 4 * 16 * 64, *dV = dK + 4 * 16 * 64;
    __nv_bfloat16 *PT = (__nv_bfloat16 *)(dV + 4 * 16 * 64), *dST = PT + 4 * 16 * WM_LD;
    float *lse_s = (float *)(dST + 4 * 16 * WM_LD), *D_s = lse_s + WM_TILE;
    int kt = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * WM_HS, C3 = 3 * C;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = kt * WM_TILE, nqt = T / WM_TILE;
    const floatX *base = qkv + (size_t)b * T * C3 + h * WM_HS;
    const floatX *dbase = dout + (size_t)b * T * C + h * WM_HS;
    wm_load_tile(Ks, base + (size_t)k0 * C3 + C, C3);
    wm_load_tile(Vs, base + (size_t)k0 * C3 + 2 * C, C3);
    float *S = Sb + w * 16 * 64, *dKw = dK + w * 16 * 64, *dVw = dV + w * 16 * 64;
    __nv_bfloat16 *P = PT + w * 16 * WM_LD, *dS = dST + w * 16 * WM_LD;
    for (int i = lane; i < 16 * 64; i += 32) { dKw[i] = 0.0f; dVw[i] = 0.0f; }
    int r = lane / 2, half = lane % 2, krow = k0 + w * 16 + r;   // this lane's key row
    for (int qt = kt; qt < nqt; qt++) {
        int q0 = qt * WM_TILE;
        __syncthreads();
        wm_load_tile(Qs, base + (size_t)q0 * C3, C3);
        wm_load_tile(dOs, dbase + (size_t)q0 * C, C);
        for (int i = threadIdx.x; i < WM_TILE; i += blockDim.x) {
            lse_s[i] = lse[(size_t)bh * T + q0 + i];
            D_s[i] = D[(size_t)bh * T + q0 + i];
        }
        __syncthreads();
        wm_mm_16x64<true>(S, Ks + w * 16 * WM_LD, Qs, false);      // S^T = K Q^T (16 keys x 64 queries)
        __syncwarp();
        for (int c = half * 32; c < half * 32 + 32; c++) {
            float pv = q0 + c >= krow ? expf(S[r * 64 + c] * scale - lse_s[c]) : 0.0f;
            P[r * WM_LD + c] = __float2bfloat16(pv);
        }
        __syncwarp();
        wm_mm_16x64<false>(dVw, P, dOs, true);                     // dV += P^T dO
        wm_mm_16x64<true>(S, Vs + w * 16 * WM_LD, dOs, false);     // dP^T = V dO^T
        __syncwarp();
        for (int c = half * 32; c < half * 32 + 32; c++) {
            float pv = __bfloat162float(P[r * WM_LD + c]);
            dS[r * WM_LD + c] = __float2bfloat16(pv * (S[r * 64 + c] - D_s[c]) * scale);
        }
        __syncwarp();
        wm_mm_16x64<false>(dKw, dS, Qs, true);                     // dK += dS^T Q
        __syncwarp();
    }
    floatX *dk = dqkv + ((size_t)b * T + krow) * C3 + C + h * WM_HS, *dv = dk + C;
    for (int c = half * 32; c < half * 32 + 32; c++) { dk[c] = tox(dKw[r * 64 + c]); dv[c] = tox(dVw[r * 64 + c]); }
}

// dQ for 64 queries of one (b, h): loop over the key tiles up to the diagonal
__global__ void __launch_bounds__(128) wmma_attention_backward_q_kernel(floatX *dqkv, const floatX *qkv, const floatX *dout,
                                                                        const float *lse, const float *D, int T, int NH, float scale) {
    extern __shared__ __align__(128) unsigned char wm_smem[];
    __nv_bfloat16 *Qs = (__nv_bfloat16 *)wm_smem, *dOs = Qs + WM_TILE * WM_LD, *Ks = dOs + WM_TILE * WM_LD, *Vs = Ks + WM_TILE * WM_LD;
    float *Sb = (float *)(Vs + WM_TILE * WM_LD), *dPb = Sb + 4 * 16 * 64, *dQ = dPb + 4 * 16 * 64;
    __nv_bfloat16 *dSb = (__nv_bfloat16 *)(dQ + 4 * 16 * 64);
    int qt = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * WM_HS, C3 = 3 * C;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * WM_TILE;
    const floatX *base = qkv + (size_t)b * T * C3 + h * WM_HS;
    wm_load_tile(Qs, base + (size_t)q0 * C3, C3);
    wm_load_tile(dOs, dout + ((size_t)b * T + q0) * C + h * WM_HS, C);
    float *S = Sb + w * 16 * 64, *dP = dPb + w * 16 * 64, *dQw = dQ + w * 16 * 64;
    __nv_bfloat16 *dS = dSb + w * 16 * WM_LD;
    for (int i = lane; i < 16 * 64; i += 32) dQw[i] = 0.0f;
    int r = lane / 2, half = lane % 2, qrow = q0 + w * 16 + r;
    float L = lse[(size_t)bh * T + qrow], Dr = D[(size_t)bh * T + qrow];
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads();
        wm_load_kv(Ks, Vs, base, kt, C, C3);
        __syncthreads();
        wm_mm_16x64<true>(S, Qs + w * 16 * WM_LD, Ks, false);     // S = Q K^T
        wm_mm_16x64<true>(dP, dOs + w * 16 * WM_LD, Vs, false);   // dP = dO V^T
        __syncwarp();
        for (int c = half * 32; c < half * 32 + 32; c++) {
            float pv = kt * WM_TILE + c <= qrow ? expf(S[r * 64 + c] * scale - L) : 0.0f;
            dS[r * WM_LD + c] = __float2bfloat16(pv * (dP[r * 64 + c] - Dr) * scale);
        }
        __syncwarp();
        wm_mm_16x64<false>(dQw, dS, Ks, true);                    // dQ += dS K
        __syncwarp();
    }
    floatX *dq = dqkv + ((size_t)b * T + qrow) * C3 + h * WM_HS;
    for (int c = half * 32; c < half * 32 + 32; c++) dq[c] = tox(dQw[r * 64 + c]);
}
#define WM_BWDQ_SMEM (4 * WM_TILE * WM_LD * 2 + 4 * 16 * 64 * 4 * 3 + 4 * 16 * WM_LD * 2)


static void wmma_forward(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH) {
    wmma_attention_forward_kernel<<<dim3(T / WM_TILE, B * NH), 128, WM_FWD_SMEM>>>(out, lse, qkv, T, NH, 0.125f);
    kernelCheck();
}

static void wmma_backward(floatX *dqkv, float *D, const floatX *dout, const floatX *out, const float *lse, const floatX *qkv, int B, int T, int NH) {
    wmma_attention_rowdot_kernel<<<ceil_div((size_t)B * T * NH, 4), 128>>>(D, dout, out, B * T, T, NH);
    wmma_attention_backward_kv_kernel<<<dim3(T / WM_TILE, B * NH), 128, WM_BWD_SMEM>>>(dqkv, qkv, dout, lse, D, T, NH, 0.125f);
    wmma_attention_backward_q_kernel<<<dim3(T / WM_TILE, B * NH), 128, WM_BWDQ_SMEM>>>(dqkv, qkv, dout, lse, D, T, NH, 0.125f);
    kernelCheck();
}


#define NVAR 5
static const char *VAR_NAMES[NVAR] = {"1: cuBLAS + softmax", "2: fused, WMMA", "3: mma.sync, 4 warps", "4: mma.sync, 8 warps", "5: cuDNN SDPA"};

static void run_forward(int v, floatX *out, floatX *att, float *lse, const floatX *qkv, int B, int T, int NH) {
    if (v == 0) attention_forward_cublas(out, att, qkv, B, T, NH * 64, NH);
    else if (v == 1) wmma_forward(out, lse, qkv, B, T, NH);
    else if (v == 2) attention_forward_flash<4>(out, lse, qkv, B, T, NH);
    else if (v == 3) attention_forward_flash<8>(out, lse, qkv, B, T, NH);
    else attention_forward_cudnn(out, lse, qkv, B, T, NH);
}
static void run_backward(int v, floatX *dqkv, float *D, const floatX *dout, const floatX *out, const floatX *att, const float *lse,
                         const floatX *qkv, int B, int T, int NH) {
    if (v == 0) attention_backward_cublas(dqkv, dout, qkv, att, B, T, NH * 64, NH);
    else if (v == 1) wmma_backward(dqkv, D, dout, out, lse, qkv, B, T, NH);
    else if (v == 2) attention_backward_flash<4>(dqkv, dout, out, lse, qkv, B, T, NH);
    else if (v == 3) attention_backward_flash<8>(dqkv, dout, out, lse, qkv, B, T, NH);
    else attention_backward_cudnn(dqkv, dout, out, lse, qkv, B, T, NH);
}

static void fill_random(floatX *d, size_t n, uint64_t *rng) {
    floatX *h = (floatX *)mallocCheck(n * sizeof(floatX));
    float tmp[1];
    for (size_t i = 0; i < n; i++) { rng_normal_fill(rng, tmp, 1, 0.0f, 1.0f); h[i] = (floatX)tmp[0]; }
    cudaCheck(cudaMemcpy(d, h, n * sizeof(floatX), cudaMemcpyHostToDevice));
    free(h);
}

// every variant (WMMA only where T % 64 == 0) against variant 1 on fresh random inputs; outputs
// poisoned with NaN first, so an unwritten element fails
static int check(int B, int T, int NH, uint64_t seed) {
    int C = NH * 64, BT = B * T;
    size_t nqkv = (size_t)BT * 3 * C, no = (size_t)BT * C;
    floatX *qkv = dalloc<floatX>(nqkv), *dout = dalloc<floatX>(no), *out[NVAR], *dqkv[NVAR], *att = dalloc<floatX>((size_t)B * NH * T * T);
    float *lse = dalloc<float>((size_t)B * NH * T), *D = dalloc<float>((size_t)B * NH * T);
    uint64_t rng = seed;
    fill_random(qkv, nqkv, &rng);
    fill_random(dout, no, &rng);
    int ok = 1;
    float *o0 = NULL, *g0 = NULL;
    for (int v = 0; v < NVAR; v++) {
        out[v] = dalloc<floatX>(no);
        dqkv[v] = dalloc<floatX>(nqkv);
        cudaCheck(cudaMemset(out[v], 0xff, no * sizeof(floatX)));   // bf16 0xffff is a NaN
        cudaCheck(cudaMemset(dqkv[v], 0xff, nqkv * sizeof(floatX)));
        if (v == 1 && T % 64 != 0) continue;
        run_forward(v, out[v], att, lse, qkv, B, T, NH);
        run_backward(v, dqkv[v], D, dout, out[v], att, lse, qkv, B, T, NH);
        cudaCheck(cudaDeviceSynchronize());
        float *o = floatx_to_host(out[v], no), *g = floatx_to_host(dqkv[v], nqkv);
        if (v == 0) { o0 = o; g0 = g; continue; }
        double worst[4] = {0, 0, 0, 0}, ref[4] = {0, 0, 0, 0};
        for (size_t i = 0; i < no; i++) {
            double e = fabs(o0[i] - o[i]);
            worst[0] = (e == e && worst[0] == worst[0]) ? fmax(worst[0], e) : NAN;
            ref[0] = fmax(ref[0], fabs(o0[i]));
        }
        for (size_t i = 0; i < nqkv; i++) {
            int part = 1 + (int)((i % (3 * C)) / C);
            double e = fabs(g0[i] - g[i]);
            worst[part] = (e == e && worst[part] == worst[part]) ? fmax(worst[part], e) : NAN;
            ref[part] = fmax(ref[part], fabs(g0[i]));
        }
        const char *names[4] = {"out", "dq", "dk", "dv"};
        int vok = 1;
        printf("B=%d T=%d NH=%d: %-22s vs 1, max abs err / max |value|:", B, T, NH, VAR_NAMES[v]);
        for (int p = 0; p < 4; p++) {
            double r = worst[p] / ref[p];
            printf(" %s %.2e", names[p], r);
            vok &= r < 2e-2;   // bf16 inputs and probabilities (2^-8 per rounding) on both sides
        }
        printf(" -> %s\n", vok ? "agree" : "DISAGREE");
        ok &= vok;
        free(o);
        free(g);
    }
    free(o0);
    free(g0);
    for (int v = 0; v < NVAR; v++) { cudaFree(out[v]); cudaFree(dqkv[v]); }
    cudaFree(qkv); cudaFree(dout); cudaFree(att); cudaFree(lse); cudaFree(D);
    return ok;
}

int main(int argc, char **argv) {
    int B = argc > 1 ? atoi(argv[1]) : 16, T = argc > 2 ? atoi(argv[2]) : 1024, NH = argc > 3 ? atoi(argv[3]) : 12;
    int C = NH * 64, BT = B * T;
    if (B < 1 || T < 64 || T % 64 || NH < 1) die("usage: bench_attention [B T NH] with T a multiple of 64");
    gpt_init_device();
    cudaCheck(cudaFuncSetAttribute(wmma_attention_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WM_FWD_SMEM));
    cudaCheck(cudaFuncSetAttribute(wmma_attention_backward_kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WM_BWD_SMEM));
    cudaCheck(cudaFuncSetAttribute(wmma_attention_backward_q_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WM_BWDQ_SMEM));
    int ok = check(B, T, NH, 1);
    ok &= check(3, 200, 2, 2);   // ragged: partial tiles (fused mma.sync variant only)
    ok &= check(2, 64, 3, 3);
    // timing: median of 9 repetitions after a warm-up, on one set of inputs (each 25-75 MB, far over L2)
    size_t nqkv = (size_t)BT * 3 * C, no = (size_t)BT * C;
    floatX *qkv = dalloc<floatX>(nqkv), *dout = dalloc<floatX>(no), *out = dalloc<floatX>(no), *dqkv = dalloc<floatX>(nqkv);
    floatX *att = dalloc<floatX>((size_t)B * NH * T * T);
    float *lse = dalloc<float>((size_t)B * NH * T), *D = dalloc<float>((size_t)B * NH * T);
    uint64_t rng = 7;
    fill_random(qkv, nqkv, &rng);
    fill_random(dout, no, &rng);
    double flops_f = 2.0 * 2.0 * B * NH * (double)T * T * 64 / 2, flops_b = 2.5 * flops_f;   // causal: half the products
    printf("B=%d T=%d NH=%d hs=64 bf16, median of 9\n%-24s %9s %9s %11s %11s\n", B, T, NH, "variant", "fwd ms", "bwd ms", "fwd TF/s", "bwd TF/s");
    for (int v = 0; v < NVAR; v++) {
        cudaEvent_t e0, e1, e2;
        cudaEventCreate(&e0); cudaEventCreate(&e1); cudaEventCreate(&e2);
        float fw[10], bw[10];
        for (int rep = 0; rep < 10; rep++) {   // repetition 0 warms up
            cudaEventRecord(e0);
            run_forward(v, out, att, lse, qkv, B, T, NH);
            cudaEventRecord(e1);
            run_backward(v, dqkv, D, dout, out, att, lse, qkv, B, T, NH);
            cudaEventRecord(e2);
            cudaCheck(cudaEventSynchronize(e2));
            cudaEventElapsedTime(&fw[rep], e0, e1);
            cudaEventElapsedTime(&bw[rep], e1, e2);
        }
        for (int i = 1; i < 10; i++)   // sort repetitions 1..9
            for (int j = i + 1; j < 10; j++) {
                if (fw[j] < fw[i]) { float t = fw[i]; fw[i] = fw[j]; fw[j] = t; }
                if (bw[j] < bw[i]) { float t = bw[i]; bw[i] = bw[j]; bw[j] = t; }
            }
        float f = fw[5], b = bw[5];
        printf("%-24s %9.3f %9.3f %11.1f %11.1f\n", VAR_NAMES[v], f, b, flops_f / (f * 1e-3) / 1e12, flops_b / (b * 1e-3) / 1e12);
    }
    printf("%s\n", ok ? "all variants agree with variant 1" : "DISAGREEMENT (see above)");
    return ok ? 0 : 1;
}
