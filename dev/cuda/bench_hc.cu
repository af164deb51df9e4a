/*
HC/mHC kernels of train_gpt_hc.cu timed against their memory floor (issues 4 and 5), n = 4:
  mhc projection forward   1: cuBLAS GEMM p = vec(H) @ phi, then rms_kernel (two passes over H)
                           2: mhc_proj_forward_kernel (tensor cores, rms from the same tiles)
  mhc dH backward          1: pre-mix backward (dH += pre_i du, dpre), cuBLAS dH += dp @ phi^T,
                              then mhc_rms_backward_kernel (three passes over dH), cuBLAS dphi = H^T dp
                           2: pre-mix backward computing dpre only, then mhc_proj_backward_kernel
                              (one pass: dH += pre_i du + dp @ phi^T + kx H), cuBLAS dphi = H^T dp
                           3: pre-mix backward computing dpre only, then mhc_dh (the trainer's): one
                              kernel for dH and the H^T dp partials, token tiles prefetched, + a reduce
  and the trainer's mixing kernels (pre-mix, post-mix + residual merge, forward and backward);
  pre-mix + the sublayer's LayerNorm
                           1: hc_premix_forward_kernel, then layernorm_forward (u read back)
                           2: hc_premix_ln_kernel: one pass
                           3: the same without storing u (the trainer's)
  LayerNorm backward + pre-mix backward
                           1: layernorm_backward, then hc_premix_backward_kernel (u and du read)
                           2: hc_ln_premix_backward (the trainer's): one pass, u recomputed
  post-mix of sublayer k + projection of sublayer k + 1
                           1: hc_postmix_forward_kernel, then mhc_proj_forward_kernel (H' read back)
                           2: hc_postmix_proj (the trainer's where fwd boundary 2 does not fit): one
                              pass, H' formed on chip
  post-mix of sublayer k + projection, gates, pre-mix and LayerNorm of sublayer k + 1
                           1: hc_postmix_proj, the gates (mhc_coeffs_forward_kernel part 1), then
                              hc_premix_ln_kernel (H' read back)
                           2: hc_fwd_boundary_kernel (the trainer's where it fits: n = 2, 4,
                              C <= 768): one kernel, a block's 16 rows of H' kept in shared memory
  dH pass of sublayer k + post-mix backward of sublayer k - 1
                           1: mhc_dh (writes dH^k), then hc_postmix_backward_kernel (reads it back)
                           2: hc_boundary_v2: one kernel, dH^k kept on chip, H^k read
                           3: hc_boundary (the trainer's at n <= 4): H^k formed on chip from
                              H^{k-1} and y^{k-1}, which it reads anyway
  and mHC's coefficient kernels (gates, Sinkhorn-Knopp forward and backward, thread per row), in
  one piece and in the trainer's two parts (Sinkhorn-Knopp apart, for the coefficient stream).
Each variant 2 (and 3) is checked against variant 1 on random inputs first. Floor = bytes that must
move (each input read once, each output written once) / the measured device-to-device copy rate.
    make dev/cuda/bench_hc && ./dev/cuda/bench_hc [B*T] [C] [check]     (default 16384 768; check: no timing)
*/
#define TESTING
#include "../../train_gpt_hc.cu"
#include "../../llmc/test_report.h"

#if defined(ENABLE_FP32)
#error "bench_hc times the bf16 kernels: build without ENABLE_FP32"
#endif

// Version 2 of the backward boundary kernel (the trainer's in sessions 7-8): as version 3, the
// trainer's hc_boundary_backward_kernel, but reading H^k from memory (two cp.async stages) and
// H^{k-1}, y^{k-1} in one stage of their own that lands while the dH products run: 4 hb + 3 xb
// per call against version 3's 3 hb + 3 xb (H^k formed on chip from H^{k-1} and y^{k-1})
template <int N>
struct BdShapeV2 {
    static constexpr int m = N * N + 2 * N, MT = m / 8, MK = (m + 15) / 16 * 16, KLD = MK + 8, TT = 64 / N, NP = N + N * N;
    static constexpr int TILE = TT * MP_LD;                 // one tile: TT tokens x 64 channels
    static constexpr int STAGE = (2 * N + 1) * TILE + TT * KLD;   // two stages of H^k, dH^k per stream, du, dp
    // one buffer of H^{k-1} per stream and y^{k-1} (dense rows, chunks swizzled: see pv_swz), and
    // res, post of sublayer k - 1 (TT N^2 + TT N floats)
    static constexpr int PREV = (N + 1) * TT * 64 + 2 * TT * NP;
    // 74 KB at n = 4: three blocks per SM
    static constexpr int SMEM = (N * 64 * KLD + 2 * STAGE + PREV) * (int)sizeof(floatX);   // + the n phi tiles
};
template <int N, bool DHC>
__global__ void __launch_bounds__(128, 3) hc_boundary_v2_kernel(floatX *dHm, floatX *dym, float *part, float *Mpart, const floatX *H,
                                                                   const floatX *dH, const floatX *dp, const float *kx, const float *k0,
                                                                   const floatX *phi, const floatX *du, const float *pre, const floatX *Hm,
                                                                   const floatX *ym, const float *postm, const float *resm, int BT, int C,
                                                                   int tiles_per_group) {
    using S = BdShapeV2<N>;
    constexpr int m = S::m, MT = S::MT, MK = S::MK, KLD = S::KLD, TT = S::TT, NP = S::NP;
    extern __shared__ __align__(16) unsigned char bd_smem[];
    floatX *Ps = reinterpret_cast<floatX *>(bd_smem);   // stream s's phi rows c0..c0+63 at Ps + s * 64 * KLD, [channel][k]
    int nC = N * C, c0 = blockIdx.y * 64, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int s = warp % N, rw = (warp / N) * 16;   // this warp's stream and first token of the tile
    int tile0 = blockIdx.x * tiles_per_group, ntile = min(tiles_per_group, (BT + TT - 1) / TT - tile0);
    auto T_ = [&](int b, int j) { return Ps + N * 64 * KLD + b * S::STAGE + j * S::TILE; };
    // stage tiles j: [0, N) H^k, [N, 2N) dH^k, 2N du, then dp; the single buffer: H^{k-1} per stream, y^{k-1}
    auto Ds = [&](int b) { return T_(b, 2 * N + 1); };
    auto Pv = [&](int j) { return T_(2, 0) + j * TT * 64; };
    float *cres = reinterpret_cast<float *>(Pv(N + 1)), *cpost = cres + TT * N * N;
    auto pv_swz = [&](int chunk, int r, int j) { return bd_pv_swz<N>(chunk, r, j); };   // (the trainer's swizzle)
    for (int i = threadIdx.x; i < N * 64 * MT; i += blockDim.x) {
        int r = i / MT, q = (i % MT) * 8;   // r = stream * 64 + channel
        cp_async16(Ps + r * KLD + q, phi + ((size_t)(r / 64) * C + c0 + r % 64) * m + q, true);
    }
    if (MK > m) {   // zero k-padding of the phi and dp tiles (cp.async never writes it)
        for (int r = threadIdx.x; r < N * 64; r += blockDim.x) *reinterpret_cast<int4 *>(Ps + r * KLD + m) = make_int4(0, 0, 0, 0);
        for (int r = threadIdx.x; r < 2 * TT; r += blockDim.x) *reinterpret_cast<int4 *>(Ds(r / TT) + (r % TT) * KLD + m) = make_int4(0, 0, 0, 0);
    }
    auto load_prev = [&](int j) {   // what the post-mix backward reads, one stage: it lands during the dH product
        int t0 = (tile0 + j) * TT, live = BT - t0;
        for (int e = threadIdx.x; e < (N + 1) * TT * 8; e += blockDim.x) {
            int i = e / (TT * 8), r = (e / 8) % TT, c = (e % 8) * 8;
            bool ok = r < live;
            const floatX *src = i < N ? Hm + ((size_t)(t0 + r) * N + i) * C + c0 + c : ym + (size_t)(t0 + r) * C + c0 + c;
            cp_async16(Pv(i) + r * 64 + pv_swz(c / 8, r, i) * 8, ok ? src : ym, ok);
        }
        for (int q = threadIdx.x; q < TT * NP / 4; q += blockDim.x) {   // res rows, then post, in 16-byte pieces
            int f = q * 4, res = f < TT * N * N, g = res ? f : f - TT * N * N, per = res ? N * N : N;
            int bytes = max(0, min(4, live * per - g)) * 4;
            const float *src = res ? resm + (size_t)t0 * N * N + g : postm + (size_t)t0 * N + g;
            cp_async16_n((res ? cres : cpost) + g, bytes > 0 ? src : postm, bytes);
        }
    };
    auto load = [&](int b, int j) {
        int t0 = (tile0 + j) * TT;
#pragma unroll
        for (int i = 0; i < N; i++) {
            fa_load_tile<TT>(T_(b, i), H + (size_t)t0 * nC + (size_t)i * C + c0, BT - t0, nC);
            fa_load_tile<TT>(T_(b, N + i), dH + (size_t)t0 * nC + (size_t)i * C + c0, BT - t0, nC);
        }
        fa_load_tile<TT>(T_(b, 2 * N), du + (size_t)t0 * C + c0, BT - t0, C);
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
        load_prev(j);   // these buffers were last read before the previous iteration's final barrier
        cp_async_commit();
        if (j + 1 < ntile) load(b ^ 1, j + 1);
        cp_async_commit();
        cp_async_wait<2>();   // tile j's stage
        __syncthreads();
        const floatX *hs = T_(b, s), *ds = Ds(b);
        float acc[8][4];
        dp_phiT_tile<MK, KLD>(acc, ds + rw * KLD, Ps + s * 64 * KLD, 0, lane);
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
        dh_tile_epilogue<N, DHC>(T_(b, N + s) + rw * MP_LD, hs + rw * MP_LD, T_(b, 2 * N) + rw * MP_LD, acc, kx + (size_t)(t0 + rw) * (DHC ? N : 1),
                                 DHC ? k0 + (size_t)(t0 + rw) * N : NULL, pre + (size_t)(t0 + rw) * N, BT - t0 - rw, s, 0, lane);
        cp_async_wait<1>();   // tile j's H^{k-1} and y^{k-1}
        __syncthreads();   // and the finished dH^k tiles
        // sublayer k - 1's post-mix backward on them: dy and res^T dH^k with 8 channels of one token
        // per thread and step (the post-mix backward kernel's arithmetic: the same values)
        for (int e = threadIdx.x; e < TT * 8; e += blockDim.x) {
            int r = e >> 3, c8 = (e & 7) * 8, t = t0 + r;
            if (t >= BT) continue;
            float rr[N * N], pp[N];
#pragma unroll
            for (int q = 0; q < N * N; q++) rr[q] = cres[r * N * N + q];
#pragma unroll
            for (int i = 0; i < N; i++) pp[i] = cpost[r * N + i];
            x128 dv[N], dyo;
#pragma unroll
            for (int i = 0; i < N; i++) dv[i] = *reinterpret_cast<const x128 *>(T_(b, N + i) + r * MP_LD + c8);
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
        // and the per-token sums over this block's 64 channels (dres, dpost): the trainer's
        bd_token_sums<N>(part, T_(b, N), S::TILE, Pv(0), t0, BT, warp, lane);
        __syncthreads();   // buffer b is refilled next iteration
    }
    bd_store_mpart<N, m, MT>(Mpart, macc, s, C, c0, warp, lane);
}

template <int N, bool DHC>
static void hc_boundary_v2(floatX *dH, float *dphi, int accumulate, const floatX *H, const floatX *dp, const float *kx, const float *k0,
                               const floatX *phi, const floatX *du, const float *pre, const HcPrev *pv, int BT, int C) {
    using S = BdShapeV2<N>;
    static bool attr = false;
    if (!attr) {   // over the 48 KB default: opt in once per instantiation
        cudaCheck(cudaFuncSetAttribute(hc_boundary_v2_kernel<N, DHC>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM));
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
    hc_boundary_v2_kernel<N, DHC><<<dim3(G, ranges), 128, S::SMEM>>>(pv->dH, pv->dy, part, Mpart, H, dH, dp, kx, k0, phi, du, pre,
                                                                           pv->H, pv->y, pv->post, pv->res, BT, C, tpg);
    kernelCheck();
    // the reduces on the coefficient stream, but dHC's dphi sums, which its parameter gradients read
    // on the main stream right away (mHC's are the gradient itself)
    cudaStream_t s = coef_begin();
    mhc_dphi_reduce_kernel<<<ceil_div(count, 256), 256, 0, DHC ? 0 : s>>>(dphi, Mpart, (int)gm, count, accumulate);
    kernelCheck();
    hc_dpost_reduce_kernel<<<ceil_div((size_t)BT * S::NP, 256), 256, 0, s>>>(pv->dpost, pv->dres, part, BT, N, ranges);
    kernelCheck();
    coef_end();
}

#define NN 4
#define MM (NN * NN + 2 * NN)

// Version 2 of the dH pass (the trainer's until session 5; version 3, mhc_dh_kernel, is in the trainer):
// dH += pre_i du + dp @ phi^T + kx * H: the pre-mix, projection and rms terms of the backward in one
// pass over dH (the pre-mix kernel then only computes dpre); dphi through cuBLAS.
// grid: (ceil(BT / 64), nC / 64) blocks of 128 threads; one 64-token x 64-channel tile each
// DHC: dhc's LayerNorm backward through the block-diagonal phi; kx and k0 (an added constant) are
// then per (token, stream) row: dH += pre_i du + dp @ phi^T + kx H + k0
template <int N, bool DHC = false>
__global__ void __launch_bounds__(128) mhc_proj_backward_kernel(floatX *dH, const floatX *H, const floatX *dp, const float *kx, const float *k0,
                                                                const floatX *phi, const floatX *du, const float *pre, int BT, int C) {
    int nC = N * C, stream = blockIdx.y * 64 / C, cu = blockIdx.y * 64 % C;   // the tile's stream and channel offset (C % 64 == 0)
    constexpr int m = N * N + 2 * N, MC = m / 8 > 0 ? m / 8 : 1, MK = (m + 15) / 16 * 16, KLD = MK + 8;   // m % 8 == 0 when launched
    // the du tile is prefetched with the others where static shared memory allows (n <= 6), else
    // loaded into the dp/phi space once the products are done
    constexpr bool DU_EARLY = (2 * 64 * MP_LD + 2 * 64 * KLD + 64 * MP_LD) * 2 <= 48 * 1024;
    __shared__ __align__(16) floatX Hs[64 * MP_LD], dHs[64 * MP_LD];
    __shared__ __align__(16) floatX DPs[2 * 64 * KLD];   // dp tile [token][k], phi rows [channel][k]; k in [m, MK) zero
    __shared__ __align__(16) floatX Us_early[DU_EARLY ? 64 * MP_LD : 8];
    floatX *Ds = DPs, *Ps = DPs + 64 * KLD, *Us = DU_EARLY ? Us_early : DPs;
    static_assert(DU_EARLY || 2 * KLD >= MP_LD, "du tile must fit in the dp/phi space");
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t0 = blockIdx.x * 64, c0 = blockIdx.y * 64;
    fa_load_tile(Hs, H + (size_t)t0 * nC + c0, BT - t0, nC);
    fa_load_tile(dHs, dH + (size_t)t0 * nC + c0, BT - t0, nC);
    if (DU_EARLY) fa_load_tile(Us, du + (size_t)t0 * C + cu, BT - t0, C);
    for (int i = threadIdx.x; i < 64 * MC; i += blockDim.x) {
        int r = i / MC, q = (i % MC) * 8;
        bool ok = t0 + r < BT;
        cp_async16(Ds + r * KLD + q, dp + (ok ? (size_t)(t0 + r) * m + q : 0), ok);
        cp_async16(Ps + r * KLD + q, phi + (size_t)(c0 + r) * m + q, true);
    }
    cp_async_commit();
    if (MK > m)
        for (int r = threadIdx.x; r < 64; r += blockDim.x) {
            *reinterpret_cast<int4 *>(Ds + r * KLD + m) = make_int4(0, 0, 0, 0);
            *reinterpret_cast<int4 *>(Ps + r * KLD + m) = make_int4(0, 0, 0, 0);
        }
    cp_async_wait<0>();
    __syncthreads();
    float acc[8][4];
    dp_phiT_tile<MK, KLD>(acc, Ds, Ps, warp, lane);
    if (!DU_EARLY) {
        __syncthreads();   // every warp is done with the dp/phi tiles
        fa_load_tile(Us, du + (size_t)t0 * C + cu, BT - t0, C);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
    }
    dh_tile_epilogue<N, DHC>(dHs, Hs, Us, acc, kx + (size_t)t0 * (DHC ? N : 1), DHC ? k0 + (size_t)t0 * N : NULL, pre + (size_t)t0 * N,
                             BT - t0, stream, warp, lane);
    __syncthreads();
    for (int i = threadIdx.x; i < 64 * 8; i += blockDim.x) {   // 16-byte coalesced stores of the tile
        int r = i >> 3, c = (i & 7) * 8;
        if (t0 + r < BT) store128(dH + (size_t)(t0 + r) * nC + c0 + c, *reinterpret_cast<x128 *>(&dHs[r * MP_LD + c]));
    }
}


static double g_copy_gbs;   // measured copy rate, bytes read + written per second / 1e9

static int g_timing = 1;   // 0 ("check"): the correctness checks only (sanitizer runs)
template <typename F>
static float median_ms(F f, int reps = 21) {
    if (!g_timing) return 0.0f;
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    f();   // warm-up
    float t[64];
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(a);
        f();
        cudaEventRecord(b);
        cudaCheck(cudaEventSynchronize(b));
        cudaEventElapsedTime(&t[r], a, b);
    }
    kernelCheck();
    for (int i = 0; i < reps; i++)
        for (int j = i + 1; j < reps; j++)
            if (t[j] < t[i]) { float x = t[i]; t[i] = t[j]; t[j] = x; }
    return t[reps / 2];
}

static int g_bad = 0;   // a check disagreed: exit status 1
static const char *verdict(bool ok) {
    if (!ok) g_bad = 1;
    return ok ? "agree" : "DISAGREE";
}

static void row(const char *name, float ms, double bytes) {
    if (!g_timing) return;
    double floor_ms = bytes / (g_copy_gbs * 1e9) * 1e3;
    printf("%-44s %9.1f us %9.1f us floor %6.0f%% of floor speed\n", name, ms * 1e3, floor_ms * 1e3, 100.0 * floor_ms / ms);
}

static floatX *rand_dev(size_t n, float scale, uint64_t *rng) {
    float *h = (float *)mallocCheck(n * sizeof(float));
    floatX *x = (floatX *)mallocCheck(n * sizeof(floatX)), *d = dalloc<floatX>(n);
    rng_normal_fill(rng, h, n, 0.0f, scale);
    for (size_t i = 0; i < n; i++) x[i] = (floatX)h[i];
    cudaCheck(cudaMemcpy(d, x, n * sizeof(floatX), cudaMemcpyHostToDevice));
    free(h);
    free(x);
    return d;
}

static float *rand_devf(size_t n, float mean, float scale, uint64_t *rng) {
    float *h = (float *)mallocCheck(n * sizeof(float)), *d = dalloc<float>(n);
    rng_normal_fill(rng, h, n, mean, scale);
    cudaCheck(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
    free(h);
    return d;
}

// device buffers as host floats
static float *host_floats(const floatX *a, size_t n) { return floatx_to_host(a, n); }
static float *host_floats(const float *a, size_t n) {
    float *x = (float *)mallocCheck(n * 4);
    cudaCheck(cudaMemcpy(x, a, n * 4, cudaMemcpyDeviceToHost));
    return x;
}

// max abs err / max |b| of two device buffers
template <typename T>
static double rel_err(const T *a, const T *b, size_t n) {
    float *x = host_floats(a, n), *y = host_floats(b, n);
    double e, m;
    diff_stats(x, y, n, &e, &m);
    free(x);
    free(y);
    return e / m;
}

// two device buffers hold the same bytes
static bool same_bits(const void *a, const void *b, size_t bytes) {
    char *x = (char *)mallocCheck(bytes), *y = (char *)mallocCheck(bytes);
    cudaCheck(cudaMemcpy(x, a, bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(y, b, bytes, cudaMemcpyDeviceToHost));
    bool same = memcmp(x, y, bytes) == 0;
    free(x);
    free(y);
    return same;
}

int main(int argc, char **argv) {
    int BT = argc > 1 ? atoi(argv[1]) : 16384, C = argc > 2 ? atoi(argv[2]) : 768, nC = NN * C;
    if (BT < 1 || C < 64 || C % 64 || (argc > 3 && strcmp(argv[3], "check")))
        die("usage: bench_hc [B*T] [C a multiple of 64] [check: the correctness checks only]");
    g_timing = argc <= 3;
    g_side_on = 0;   // the trainer's side and coefficient streams off: every kernel timed on one stream
    gpt_init_device();
    uint64_t rng = 5;
    size_t nh = (size_t)BT * nC;
    // copy rate: 2 GB moved (1 GB read + 1 GB written) per copy
    if (g_timing) {
        size_t sz = (size_t)1 << 30;
        char *a = dalloc<char>(sz), *b = dalloc<char>(sz);
        cudaCheck(cudaMemset(a, 1, sz));
        float ms = median_ms([&] { cudaCheck(cudaMemcpy(b, a, sz, cudaMemcpyDeviceToDevice)); }, 9);
        g_copy_gbs = 2.0 * sz / (ms * 1e-3) / 1e9;
        cudaFree(a);
        cudaFree(b);
    }
    if (g_timing) printf("BT=%d C=%d n=%d bf16; device-to-device copy %.0f GB/s (read + write)\n", BT, C, NN, g_copy_gbs);
    else printf("BT=%d C=%d n=%d bf16; checks only\n", BT, C, NN);
    floatX *H = rand_dev(nh, 1.0f, &rng), *dH = rand_dev(nh, 1.0f, &rng), *phi = rand_dev((size_t)nC * MM, 0.02f, &rng);
    floatX *dp = rand_dev((size_t)BT * MM, 1.0f, &rng), *y = rand_dev((size_t)BT * C, 1.0f, &rng), *du = rand_dev((size_t)BT * C, 1.0f, &rng);
    floatX *dH2 = dalloc<floatX>(nh), *Hn = dalloc<floatX>(nh), *u = dalloc<floatX>((size_t)BT * C), *dy = dalloc<floatX>((size_t)BT * C);
    float *kx = rand_devf(BT, 0.0f, 0.01f, &rng), *pre = rand_devf((size_t)BT * NN, 0.5f, 0.1f, &rng);
    float *post = rand_devf((size_t)BT * NN, 1.0f, 0.1f, &rng), *res = rand_devf((size_t)BT * NN * NN, 0.25f, 0.05f, &rng);
    float *p0 = dalloc<float>((size_t)BT * MM), *p1 = dalloc<float>((size_t)BT * MM), *r0 = dalloc<float>(BT), *r1 = dalloc<float>(BT);
    float *dpre = dalloc<float>((size_t)BT * NN), *dpost = dalloc<float>((size_t)BT * NN), *dres = dalloc<float>((size_t)BT * NN * NN);
    const float one = 1.0f, zero = 0.0f;
    auto fwd1 = [&] {
        cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, MM, BT, nC, &one, phi, CUBLAS_X, MM, H, CUBLAS_X, nC, &zero, p0,
                                 CUDA_R_32F, MM, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        rms_kernel<<<ceil_div(BT, 4), 128>>>(r0, H, BT, nC);
    };
    auto fwd2 = [&] { mhc_proj_forward_kernel<NN><<<ceil_div(BT, 64), 128>>>(p1, r1, NULL, H, phi, BT, nC, C); };
    float *dpre1 = dalloc<float>((size_t)BT * NN);
    floatX *dH3 = dalloc<floatX>(nh);
    float *dphi1 = dalloc<float>((size_t)nC * MM), *dphi2 = dalloc<float>((size_t)nC * MM), *dphi3 = dalloc<float>((size_t)nC * MM);
    auto dphi_gemm = [&](float *out) {
        cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_T, MM, nC, BT, &one, dp, CUBLAS_X, MM, H, CUBLAS_X, nC, &zero, out,
                                 CUDA_R_32F, MM, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    auto bwd1 = [&] {
        hc_premix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(dH, dpre1, du, H, pre, BT, C);
        cublasCheck(cublasGemmEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, nC, BT, MM, &one, phi, CUBLAS_X, MM, dp, CUBLAS_X, MM, &one, dH,
                                 CUBLAS_X, nC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        mhc_rms_backward_kernel<<<dim3(BT, ceil_div(nC / X128, 128)), 128>>>(dH, H, kx, nC);
        dphi_gemm(dphi1);
    };
    auto bwd2 = [&] {
        hc_premix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(NULL, dpre1, du, H, pre, BT, C);
        mhc_proj_backward_kernel<NN><<<dim3(ceil_div(BT, 64), nC / 64), 128>>>(dH2, H, dp, kx, NULL, phi, du, pre, BT, C);
        dphi_gemm(dphi2);
    };
    auto bwd3 = [&] {
        hc_premix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(NULL, dpre1, du, H, pre, BT, C);
        mhc_dh<false>(NN, dH3, dphi3, 0, H, dp, kx, NULL, phi, du, pre, BT, C);
    };
    // correctness of the variants 2 and 3 (one application each, from the same dH)
    cudaCheck(cudaMemcpy(dH2, dH, nh * sizeof(floatX), cudaMemcpyDeviceToDevice));
    cudaCheck(cudaMemcpy(dH3, dH, nh * sizeof(floatX), cudaMemcpyDeviceToDevice));
    fwd1(); fwd2(); bwd1(); bwd2(); bwd3();
    kernelCheck();
    {
        double e3 = rel_err(dH3, dH, nh), ep = rel_err(dphi3, dphi1, (size_t)nC * MM);
        printf("check: dH pass 3 dH rel err %.1e, dphi rel err %.1e -> %s\n", e3, ep, verdict(e3 < 1e-2 && ep < 1e-4));
        double e = rel_err(p1, p0, (size_t)BT * MM), ed = rel_err(dH2, dH, nh);
        printf("check: projection forward p rel err %.1e, dH backward rel err %.1e -> %s\n", e, ed, verdict(e < 1e-3 && ed < 1e-2));
    }
    double hb = (double)nh * 2, xb = (double)BT * C * 2;
    row("mhc proj fwd 1: cuBLAS GEMM + rms kernel", median_ms(fwd1), hb + BT * MM * 4.0);
    row("mhc proj fwd 2: tensor-core kernel", median_ms(fwd2), hb + BT * MM * 4.0);
    row("mhc dH bwd 1: pre-mix bwd + cuBLAS + rms bwd", median_ms(bwd1), 3 * hb + xb);
    row("mhc dH bwd 2: dpre pass + tensor-core kernel", median_ms(bwd2), 3 * hb + xb);
    row("mhc dH bwd 3: dpre pass + one-pass dH/dphi kernel", median_ms(bwd3), 3 * hb + xb);
    row("pre-mix forward u = sum pre_i H_i", median_ms([&] {
            hc_premix_forward_kernel<NN><<<ceil_div(BT, 4), 128>>>(u, H, pre, BT, C);
        }), hb + xb);
    row("post-mix forward H' = res H + post y", median_ms([&] {
            hc_postmix_forward_kernel<NN><<<ceil_div(BT, 4), 128>>>(Hn, H, y, post, res, BT, C);
        }), 2 * hb + xb);
    row("post-mix backward (dH, dy, dpost, dres)", median_ms([&] {
            hc_postmix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(dH2, dy, dpost, dres, dH, H, y, post, res, BT, C);
        }), 3 * hb + 2 * xb);
    row("pre-mix backward (dH +=, dpre)", median_ms([&] {
            hc_premix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(dH2, dpre, du, H, pre, BT, C);
        }), 3 * hb + xb);
    // the pre-mix and the LayerNorm that starts the sublayer
    floatX *u2 = dalloc<floatX>((size_t)BT * C), *ln1 = dalloc<floatX>((size_t)BT * C), *ln2 = dalloc<floatX>((size_t)BT * C);
    floatX *lnw = rand_dev(C, 1.0f, &rng), *lnb = rand_dev(C, 0.1f, &rng);
    float *lm1 = dalloc<float>(BT), *lr1 = dalloc<float>(BT), *lm2 = dalloc<float>(BT), *lr2 = dalloc<float>(BT);
    auto pl1 = [&] {
        hc_premix_forward_kernel<NN><<<ceil_div(BT, 4), 128>>>(u, H, pre, BT, C);
        layernorm_forward(ln1, lm1, lr1, u, lnw, lnb, BT, C);
    };
    auto pl2 = [&] { hc_premix_ln_kernel<NN><<<ceil_div(BT, 8), 256>>>(u2, ln2, lm2, lr2, H, pre, lnw, lnb, BT, C); };
    floatX *ln3 = dalloc<floatX>((size_t)BT * C);
    float *lm3 = dalloc<float>(BT), *lr3 = dalloc<float>(BT);
    auto pl3 = [&] { hc_premix_ln_kernel<NN><<<ceil_div(BT, 8), 256>>>(NULL, ln3, lm3, lr3, H, pre, lnw, lnb, BT, C); };
    pl1();
    pl2();
    pl3();
    kernelCheck();
    {
        size_t xs = (size_t)BT * C * sizeof(floatX);
        bool same = same_bits(u, u2, xs) && same_bits(ln1, ln2, xs) && same_bits(lm1, lm2, BT * 4) && same_bits(lr1, lr2, BT * 4);
        printf("check: pre-mix + LayerNorm fused: u, ln, mean, rstd %s -> %s\n", same ? "bit-identical" : "DIFFERENT", verdict(same));
        same = same_bits(ln1, ln3, xs) && same_bits(lm1, lm3, BT * 4) && same_bits(lr1, lr3, BT * 4);
        printf("check: pre-mix + LayerNorm fused, u not stored: ln, mean, rstd %s -> %s\n", same ? "bit-identical" : "DIFFERENT",
               verdict(same));
    }
    row("pre-mix + LayerNorm 1: two kernels", median_ms(pl1), hb + 2 * xb + BT * 8.0);
    row("pre-mix + LayerNorm 2: one kernel", median_ms(pl2), hb + 2 * xb + BT * 8.0);
    row("pre-mix + LayerNorm 3: one kernel, u not stored", median_ms(pl3), hb + xb + BT * 8.0);
    // the LayerNorm backward and the pre-mix backward (dpre; with dH also dH += pre_i du), from the
    // forward's ln statistics: 1 the two kernels (u read), 2 one pass recomputing u
    floatX *dln = rand_dev((size_t)BT * C, 1.0f, &rng), *du1 = dalloc<floatX>((size_t)BT * C), *du2 = dalloc<floatX>((size_t)BT * C);
    float *dpb1 = dalloc<float>((size_t)BT * NN), *dpb2 = dalloc<float>((size_t)BT * NN), *dwb = dalloc<float>(4 * (size_t)C);
    floatX *dHb1 = dalloc<floatX>(nh), *dHb2 = dalloc<floatX>(nh);
    auto lb1 = [&](floatX *dHx) {
        layernorm_backward(du1, dwb, dwb + C, dln, u, lnw, lm1, lr1, BT, C, NULL, 1);
        hc_premix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(dHx, dpb1, du1, H, pre, BT, C);
    };
    auto lb2 = [&](floatX *dHx) { hc_ln_premix_backward(NN, du2, dpb2, dHx, dwb + 2 * C, dwb + 3 * C, dln, H, pre, lnw, lm1, lr1, BT, C); };
    {
        cudaCheck(cudaMemset(dwb, 0, 4 * C * sizeof(float)));
        cudaCheck(cudaMemcpy(dHb1, dH, nh * sizeof(floatX), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(dHb2, dH, nh * sizeof(floatX), cudaMemcpyDeviceToDevice));
        lb1(dHb1);
        lb2(dHb2);
        kernelCheck();
        size_t xs = (size_t)BT * C * sizeof(floatX);
        bool same = same_bits(du1, du2, xs) && same_bits(dpb1, dpb2, BT * NN * 4) && same_bits(dHb1, dHb2, nh * sizeof(floatX));
        same = same && same_bits(dwb, dwb + 2 * C, 2 * C * 4);
        printf("check: LayerNorm + pre-mix backward fused: du, dpre, dH, dw, db %s -> %s\n", same ? "bit-identical" : "DIFFERENT",
               verdict(same));
    }
    row("LayerNorm + pre-mix backward 1: two kernels (dpre)", median_ms([&] { lb1(NULL); }), hb + 4 * xb + BT * 8.0);
    row("LayerNorm + pre-mix backward 2: one pass, u recomputed", median_ms([&] { lb2(NULL); }), hb + 2 * xb + BT * 8.0);
    // boundary fusion: the post-mix of sublayer k and the projection of sublayer k + 1
    floatX *Hn2 = dalloc<floatX>(nh);
    float *p2 = dalloc<float>((size_t)BT * MM), *r2 = dalloc<float>(BT);
    auto bnd1 = [&] {
        hc_postmix_forward_kernel<NN><<<ceil_div(BT, 4), 128>>>(Hn, H, y, post, res, BT, C);
        mhc_proj_forward_kernel<NN><<<ceil_div(BT, 64), 128>>>(p1, r1, NULL, Hn, phi, BT, nC, C);
    };
    auto bnd2 = [&] { hc_postmix_proj(NN, false, Hn2, p2, r2, NULL, H, y, post, res, phi, BT, C); };
    bnd1();
    bnd2();
    kernelCheck();
    {
        bool same = same_bits(Hn, Hn2, nh * sizeof(floatX));
        double e = rel_err(p2, p1, (size_t)BT * MM), er = rel_err(r2, r1, (size_t)BT);
        printf("check: post-mix + projection fused: H' %s, p rel err %.1e, rms rel err %.1e -> %s\n", same ? "bit-identical" : "DIFFERENT",
               e, er, verdict(same && e < 1e-4 && er < 1e-5));
    }
    row("post-mix fwd + next projection 1: two kernels", median_ms(bnd1), 2 * hb + xb + BT * MM * 4.0);
    row("post-mix fwd + next projection 2: one kernel", median_ms(bnd2), 2 * hb + xb + BT * MM * 4.0);
    // the whole forward boundary: the post-mix of sublayer k, then sublayer k + 1's projection, gates,
    // pre-mix and LayerNorm (u not stored). 1: the kernels apart; 2: one kernel on whole rows (where
    // it fits: C <= 768 at n = 4)
    {
        float *gbias = rand_devf(MM, 0.0f, 0.5f, &rng), *galpha = rand_devf(3, 1.0f, 0.1f, &rng);
        float *pra = dalloc<float>((size_t)BT * NN), *prb = dalloc<float>((size_t)BT * NN), *poa = dalloc<float>((size_t)BT * NN);
        float *pob = dalloc<float>((size_t)BT * NN), *za = dalloc<float>((size_t)BT * MM), *zb2 = dalloc<float>((size_t)BT * MM);
        float *rma = dalloc<float>(BT), *rmb = dalloc<float>(BT), *lma = dalloc<float>(BT), *lra = dalloc<float>(BT);
        float *lmb = dalloc<float>(BT), *lrb = dalloc<float>(BT);
        floatX *lna = dalloc<floatX>((size_t)BT * C), *lnb2 = dalloc<floatX>((size_t)BT * C), *Hfa = dalloc<floatX>(nh), *Hfb = dalloc<floatX>(nh);
        size_t nfrag = (size_t)nC / 16 * (MM / 8) * 32;
        uint2 *phif = dalloc<uint2>(nfrag);
        phi_frag_kernel<<<dim3(ceil_div(nfrag, 256), 1), 256>>>(phif, phi, nC, MM);
        auto fw1 = [&] {
            hc_postmix_proj(NN, false, Hfa, p2, rma, NULL, H, y, post, res, phi, BT, C);
            mhc_coeffs_forward_kernel<NN><<<ceil_div((size_t)BT * sk_group(NN), 128), 128>>>(pra, poa, NULL, rma, za, p2, gbias, galpha, BT, NN,
                                                                                           20, 1);
            hc_premix_ln_kernel<NN><<<ceil_div(BT, 8), 256>>>(NULL, lna, lma, lra, Hfa, pra, lnw, lnb, BT, C);
        };
        fw1();
        double pm = BT * (MM * 4.0 * 2 + 4 + 2 * NN * 4);   // p written and read, rms, pre, post (z: MM * 4)
        row("fwd boundary 1: post-mix+proj, gates, pre-mix+LN", median_ms(fw1), 3 * hb + 2 * xb + pm + BT * (MM * 4.0 + 8));
        if (fb_fits(NN, C)) {
            FbArgs g = {};   // mhc: the dhc fields stay NULL
            g.Hout = Hfb, g.H = H, g.y = y, g.post = post, g.res = res, g.phif = phif, g.pre = prb, g.post1 = pob, g.z = zb2, g.st0 = rmb;
            g.bias = gbias, g.alpha = galpha, g.ln = lnb2, g.ln_mean = lmb, g.ln_rstd = lrb, g.lnw = lnw, g.lnb = lnb, g.BT = BT, g.C = C;
            auto fw2 = [&] { hc_fwd_boundary(NN, false, g); };
            cudaCheck(cudaMemset(Hfb, 0xff, nh * sizeof(floatX)));   // NaN: an unwritten output fails
            cudaCheck(cudaMemset(lnb2, 0xff, (size_t)BT * C * sizeof(floatX)));
            fw2();
            kernelCheck();
            bool same = same_bits(Hfa, Hfb, nh * sizeof(floatX));
            double ec = fmax(fmax(rel_err(prb, pra, (size_t)BT * NN), rel_err(pob, poa, (size_t)BT * NN)),
                             fmax(rel_err(zb2, za, (size_t)BT * MM), rel_err(rmb, rma, (size_t)BT)));
            double el = fmax(rel_err(lnb2, lna, (size_t)BT * C), fmax(rel_err(lmb, lma, (size_t)BT), rel_err(lrb, lra, (size_t)BT)));
            printf("check: whole-row forward boundary: H' %s, pre/post/z/rms rel err <= %.1e, ln/mean/rstd <= %.1e -> %s\n",
                   same ? "bit-identical" : "DIFFERENT", ec, el, verdict(same && ec < 1e-5 && el < 1e-2));
            row("fwd boundary 2: one kernel, H' kept on chip", median_ms(fw2), 2 * hb + 2 * xb + BT * (MM * 4.0 + 4 + 2 * NN * 4 + 8));
        } else {
            printf("fwd boundary 2: two blocks of %d tokens do not fit on an SM at C=%d (the trainer keeps the kernels apart)\n", FB_TOK, C);
        }
    }
    // backward boundary fusion: the dH pass of sublayer k and the post-mix backward of sublayer k - 1
    floatX *Hm = rand_dev(nh, 1.0f, &rng), *dHk = dalloc<floatX>(nh), *dHm1 = dalloc<floatX>(nh), *dHm2 = dalloc<floatX>(nh);
    floatX *dy2 = dalloc<floatX>((size_t)BT * C);
    float *dpost2 = dalloc<float>((size_t)BT * NN), *dres2 = dalloc<float>((size_t)BT * NN * NN), *dphi4 = dalloc<float>((size_t)nC * MM);
    // H^k is the post-mix of H^{k-1} (version 3 forms it on chip from H^{k-1} and y^{k-1})
    floatX *Hk = dalloc<floatX>(nh), *dHm3 = dalloc<floatX>(nh), *dy3 = dalloc<floatX>((size_t)BT * C);
    hc_postmix_forward_kernel<NN><<<ceil_div(BT, 4), 128>>>(Hk, Hm, y, post, res, BT, C);
    float *dpost3 = dalloc<float>((size_t)BT * NN), *dres3 = dalloc<float>((size_t)BT * NN * NN), *dphi5 = dalloc<float>((size_t)nC * MM);
    HcPrev pv = {dHm2, dy2, dpost2, dres2, Hm, y, post, res}, pv3 = {dHm3, dy3, dpost3, dres3, Hm, y, post, res};
    auto bb1 = [&] {
        mhc_dh<false>(NN, dHk, dphi3, 0, Hk, dp, kx, NULL, phi, du, pre, BT, C);
        hc_postmix_backward_kernel<NN><<<ceil_div(BT, 4), 128>>>(dHm1, dy, dpost, dres, dHk, Hm, y, post, res, BT, C);
    };
    auto bb2 = [&] { hc_boundary_v2<NN, false>(dH, dphi4, 0, Hk, dp, kx, NULL, phi, du, pre, &pv, BT, C); };
    auto bb3 = [&] { hc_boundary<false>(NN, dH, dphi5, 0, dp, kx, NULL, phi, du, pre, &pv3, BT, C); };
    cudaCheck(cudaMemcpy(dHk, dH, nh * sizeof(floatX), cudaMemcpyDeviceToDevice));   // variant 1 accumulates into dH^k
    bb1();
    bb2();
    bb3();
    kernelCheck();
    {
        size_t xs = (size_t)BT * C * sizeof(floatX);
        bool same = same_bits(dHm1, dHm2, nh * sizeof(floatX)) && same_bits(dy, dy2, xs);
        double worst = fmax(rel_err(dpost2, dpost, (size_t)BT * NN),
                            fmax(rel_err(dres2, dres, (size_t)BT * NN * NN), rel_err(dphi4, dphi3, (size_t)nC * MM)));
        printf("check: dH pass + previous post-mix backward fused: dH^{k-1}, dy %s, dpost/dres/dphi rel err <= %.1e -> %s\n",
               same ? "bit-identical" : "DIFFERENT", worst, verdict(same && worst < 1e-5));
        same = same_bits(dHm3, dHm2, nh * sizeof(floatX)) && same_bits(dy3, dy2, xs) && same_bits(dpost3, dpost2, BT * NN * 4) &&
               same_bits(dres3, dres2, BT * NN * NN * 4) && same_bits(dphi5, dphi4, (size_t)nC * MM * 4);
        printf("check: boundary kernel 3 (H^k formed on chip) vs 2: dH^{k-1}, dy, dpost, dres, dphi %s -> %s\n",
               same ? "bit-identical" : "DIFFERENT", verdict(same));
    }
    row("dH pass + prev post-mix bwd 1: two kernels", median_ms(bb1), 4 * hb + 3 * xb + BT * MM * 2.0);
    row("dH pass + prev post-mix bwd 2: one kernel, H^k read", median_ms(bb2), 4 * hb + 3 * xb + BT * MM * 2.0);
    row("dH pass + prev post-mix bwd 3: H^k formed on chip", median_ms(bb3), 3 * hb + 3 * xb + BT * MM * 2.0);
    // mHC's coefficients: gates and Sinkhorn-Knopp (20 iterations), forward and backward, one thread
    // per matrix row (latency-bound: the floor counts their few bytes per token)
    float *zb = dalloc<float>((size_t)BT * MM), *bias = rand_devf(MM, 0.0f, 0.5f, &rng), *alpha = rand_devf(3, 1.0f, 0.1f, &rng);
    float *pre2 = dalloc<float>((size_t)BT * NN), *post2 = dalloc<float>((size_t)BT * NN), *res2 = dalloc<float>((size_t)BT * NN * NN);
    float *kx2 = dalloc<float>(BT), *rows = dalloc<float>((size_t)BT * (MM + 3));
    floatX *dpx = dalloc<floatX>((size_t)BT * MM);
    int G = sk_group(NN), iters = 20;
    // The trainer runs each in two parts: the gates (forward) and the rest (backward) on the main
    // stream, Sinkhorn-Knopp on the coefficient stream beside the sublayer's GEMMs (part 3: both)
    auto cf = [&](int part) {
        mhc_coeffs_forward_kernel<NN><<<ceil_div((size_t)BT * G, 128), 128>>>(pre2, post2, res2, r0, zb, p0, bias, alpha, BT, NN, iters, part);
    };
    // part 1 replaces dres by the res logits' gradient: it works on a copy of dres, made before each call
    float *dresg = dalloc<float>((size_t)BT * NN * NN);
    auto cb = [&](int part) {
        if (part & 1) cudaCheck(cudaMemcpyAsync(dresg, dres, (size_t)BT * NN * NN * sizeof(float), cudaMemcpyDeviceToDevice));
        mhc_coeffs_backward_kernel<NN><<<ceil_div((size_t)BT * G, 64), 64, 2 * iters * 64 * sizeof(float)>>>(
            dpx, kx2, rows, dpre, dpost, dresg, pre2, post2, r0, zb, bias, alpha, BT, NN, C, iters, NULL, part);
    };
    {   // the parts one after the other give the same bits as the kernel in one piece
        cf(3);
        cb(3);
        floatX *dpx3 = dalloc<floatX>((size_t)BT * MM);
        float *res3 = dalloc<float>((size_t)BT * NN * NN), *rows3 = dalloc<float>((size_t)BT * (MM + 3)), *kx3 = dalloc<float>(BT);
        float *z3 = dalloc<float>((size_t)BT * MM);
        cudaCheck(cudaMemcpy(res3, res2, (size_t)BT * NN * NN * sizeof(float), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(z3, zb, (size_t)BT * MM * sizeof(float), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(dpx3, dpx, (size_t)BT * MM * sizeof(floatX), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(rows3, rows, (size_t)BT * (MM + 3) * sizeof(float), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(kx3, kx2, BT * sizeof(float), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemset(res2, 0, (size_t)BT * NN * NN * sizeof(float)));
        cudaCheck(cudaMemset(zb, 0, (size_t)BT * MM * sizeof(float)));
        cf(1);
        cf(2);
        cb(1);
        cb(2);
        cudaCheck(cudaDeviceSynchronize());
        bool same = same_bits(res3, res2, (size_t)BT * NN * NN * sizeof(float)) && same_bits(z3, zb, (size_t)BT * MM * sizeof(float)) &&
                    same_bits(dpx3, dpx, (size_t)BT * MM * sizeof(floatX)) && same_bits(rows3, rows, (size_t)BT * (MM + 3) * sizeof(float)) &&
                    same_bits(kx3, kx2, BT * sizeof(float));
        printf("check: mhc coefficients in two parts (gates | Sinkhorn-Knopp): res, z, dp, rows, kx %s -> %s\n",
               same ? "bit-identical" : "DIFFERENT", verdict(same));
    }
    double fb = BT * (2.0 * MM * 4 + 4 + (2 * NN + NN * NN) * 4), bb = BT * (MM * 4.0 + 4 + (3 * NN + NN * NN) * 4 + (MM + 3) * 4 + MM * 2 + 4);
    row("mhc coefficients fwd (gates + Sinkhorn)", median_ms([&] { cf(3); }), fb);
    row("mhc coefficients fwd part 1 (gates, z)", median_ms([&] { cf(1); }), BT * (MM * 8.0 + 4 + 2 * NN * 4));
    row("mhc coefficients fwd part 2 (Sinkhorn)", median_ms([&] { cf(2); }), BT * NN * NN * 8.0);
    row("mhc coefficients bwd (Sinkhorn recomputed)", median_ms([&] { cb(3); }), bb);
    row("mhc coefficients bwd part 1 (Sinkhorn; dres copy)", median_ms([&] { cb(1); }), BT * NN * NN * 20.0);
    row("mhc coefficients bwd part 2 (gates, dp, rows)", median_ms([&] { cb(2); }), bb - BT * NN * NN * 4.0);
    if (g_bad) printf("error: a kernel variant disagrees with its reference\n");
    return g_bad;
}
