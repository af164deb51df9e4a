/*
gpt_hc CPU reference trainer: GPT-2 whose residual connection is chosen by a flag
  residual  plain pre-norm residual stream                           h <- h + F(h)
  shc       static Hyper-Connections (Zhu et al., arXiv 2409.19606)
  dhc       dynamic Hyper-Connections (same paper, tanh-gated dynamic weights)
  mhc       manifold-constrained HC (DeepSeek-AI, arXiv 2512.24880, Sinkhorn-Knopp)
The math is ../shared/SPEC.md; the files are docs/FORMATS.md. One file, fp32, OpenMP, every
op with a _forward and a hand-written _backward, in the style of llm.c's train_gpt2.c.

All HC variants are expressed through per-token coefficients of each sublayer k:
    u     = sum_i pre[i] H_i                      (the sublayer's input)
    y     = F_k(u)
    H'_i  = sum_j res[i][j] H_j + post[i] y       (the new n x C state)
shc/dhc/mhc differ only in how (pre, post, res) come from the state and the parameters, so
the mixing ops and their backward are shared and each mode adds one _forward/_backward pair.
*/
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef OMP
#include <omp.h>
#endif
#include "llmc/utils.h"
#include "llmc/gpt_hc_formats.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/rand.h"
#include "llmc/model_common.h"
#include "llmc/params.h"

// ----------------------------------------------------------------------------
// scratch memory for transposes and per-token temporaries (grown on demand, used outside
// parallel regions only)

static float *g_scratch[4];
static size_t g_scratch_size[4];

static float *scratch(int slot, size_t n) {
    if (g_scratch_size[slot] < n) {
        free(g_scratch[slot]);
        g_scratch[slot] = (float *)mallocCheck(n * sizeof(float));
        g_scratch_size[slot] = n;
    }
    return g_scratch[slot];
}

// ----------------------------------------------------------------------------
// matmul: one register-tiled kernel out[M][N] (+)= A[M][K] B[K][N], B row-major along N, so
// the inner loop is a contiguous axpy that vectorizes without -ffast-math. Each output tile
// belongs to one thread and is summed in a fixed order: results do not depend on threads.

#define TM 6      // rows of a register tile
#define TN 16     // columns: two 8-wide vectors
#define KC 256    // reduction block: a KC x TN panel of B (16 KB) stays in L1 across row tiles

typedef float v8f __attribute__((vector_size(32), aligned(4)));   // unaligned loads are fine

// explicit vectors: the compiler keeps the 6x16 accumulator tile in 12 registers
static void gemm_tile_full(float *out, int ldo, const float *A, int lda, const float *B, int ldb, int K, int accumulate) {
    v8f acc[TM][2];
    for (int r = 0; r < TM; r++) {
        if (accumulate) {
            acc[r][0] = *(const v8f *)(out + (size_t)r * ldo);
            acc[r][1] = *(const v8f *)(out + (size_t)r * ldo + 8);
        } else {
            acc[r][0] = (v8f){0};
            acc[r][1] = (v8f){0};
        }
    }
    for (int k = 0; k < K; k++) {
        const float *b = B + (size_t)k * ldb;
        v8f b0 = *(const v8f *)b, b1 = *(const v8f *)(b + 8);
#pragma GCC unroll 8
        for (int r = 0; r < TM; r++) {
            float a = A[(size_t)r * lda + k];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }
    for (int r = 0; r < TM; r++) {
        *(v8f *)(out + (size_t)r * ldo) = acc[r][0];
        *(v8f *)(out + (size_t)r * ldo + 8) = acc[r][1];
    }
}

static void gemm_tile_edge(float *out, int ldo, const float *A, int lda, const float *B, int ldb, int K,
                           int accumulate, int mr, int nr) {
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) {
            float s = accumulate ? out[(size_t)r * ldo + j] : 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)r * lda + k] * B[(size_t)k * ldb + j];
            out[(size_t)r * ldo + j] = s;
        }
}

static void gemm(float *out, const float *A, const float *B, int M, int N, int K, int lda, int ldb, int ldo, int accumulate) {
    int mt = (M + TM - 1) / TM, nt = (N + TN - 1) / TN;
    // column panels are owned by threads; within one, K is walked in KC blocks in a fixed
    // order, so every output element is summed the same way whatever the thread count
#pragma omp parallel for schedule(static)
    for (int jt = 0; jt < nt; jt++) {
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC;
            int acc = accumulate || k0 > 0;
            for (int it = 0; it < mt; it++) {
                int i0 = it * TM, j0 = jt * TN;
                int mr = M - i0 < TM ? M - i0 : TM, nr = N - j0 < TN ? N - j0 : TN;
                float *o = out + (size_t)i0 * ldo + j0;
                const float *a = A + (size_t)i0 * lda + k0;
                const float *b = B + (size_t)k0 * ldb + j0;
                if (mr == TM && nr == TN) gemm_tile_full(o, ldo, a, lda, b, ldb, kc, acc);
                else gemm_tile_edge(o, ldo, a, lda, b, ldb, kc, acc, mr, nr);
            }
        }
    }
}

static void transpose(float *dst, const float *src, int rows, int cols) {   // dst[c][r] = src[r][c]
#pragma omp parallel for schedule(static)
    for (int cb = 0; cb < cols; cb += 32)
        for (int rb = 0; rb < rows; rb += 32)
            for (int c = cb; c < cb + 32 && c < cols; c++)
                for (int r = rb; r < rb + 32 && r < rows; r++) dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

// out (BT, OC) = inp (BT, C) @ weight(OC, C)^T + bias
void matmul_forward(float *out, const float *inp, const float *weight, const float *bias, int BT, int C, int OC) {
    float *wt = scratch(0, (size_t)C * OC);
    transpose(wt, weight, OC, C);
    gemm(out, inp, wt, BT, OC, C, C, OC, OC, 0);
    if (bias != NULL) {
#pragma omp parallel for schedule(static)
        for (int bt = 0; bt < BT; bt++)
            for (int o = 0; o < OC; o++) out[(size_t)bt * OC + o] += bias[o];
    }
}

// accumulates into dinp, dweight, dbias
void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int BT, int C, int OC) {
    gemm(dinp, dout, weight, BT, C, OC, OC, C, C, 1);              // dinp += dout @ W
    float *doutT = scratch(0, (size_t)OC * BT);
    transpose(doutT, dout, BT, OC);
    gemm(dweight, doutT, inp, OC, C, BT, BT, C, C, 1);             // dW += dout^T @ inp
    if (dbias != NULL) {
#pragma omp parallel for schedule(static)
        for (int o = 0; o < OC; o++) {
            float s = 0.0f;
            for (int bt = 0; bt < BT; bt++) s += doutT[(size_t)o * BT + bt];
            dbias[o] += s;
        }
    }
}

// ----------------------------------------------------------------------------
// base transformer ops (as llm.c's train_gpt2.c)

void encoder_forward(float *out, const int *inp, const float *wte, const float *wpe, int B, int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *we = wte + (size_t)inp[b * T + t] * C, *pe = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = we[i] + pe[i];
        }
}

void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *inp, int B, int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *dwe = dwte + (size_t)inp[b * T + t] * C, *dpe = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) { dwe[i] += d[i]; dpe[i] += d[i]; }
        }
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                       const float *bias, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const float *x = inp + (size_t)r * C;
        float m = 0.0f, v = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        float s = 1.0f / sqrtf(v / C + 1e-5f);
        float *o = out + (size_t)r * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[r] = m;
        rstd[r] = s;
    }
}

// accumulates into dinp, dweight, dbias
void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, const float *mean, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const float *d = dout + (size_t)r * C, *x = inp + (size_t)r * C;
        float m = mean[r], s = rstd[r], dn_mean = 0.0f, dn_xhat = 0.0f;
        for (int i = 0; i < C; i++) {
            float dn = weight[i] * d[i];
            dn_mean += dn;
            dn_xhat += dn * (x[i] - m) * s;
        }
        dn_mean /= C;
        dn_xhat /= C;
        float *di = dinp + (size_t)r * C;
        for (int i = 0; i < C; i++) di[i] += s * (weight[i] * d[i] - dn_mean - (x[i] - m) * s * dn_xhat);
    }
    // parameter gradients: each channel summed over rows in order by one thread
#pragma omp parallel for schedule(static)
    for (int cb = 0; cb < C; cb += 16) {
        for (int r = 0; r < N; r++) {
            const float *d = dout + (size_t)r * C, *x = inp + (size_t)r * C;
            for (int i = cb; i < cb + 16 && i < C; i++) {
                dbias[i] += d[i];
                dweight[i] += d[i] * (x[i] - mean[r]) * rstd[r];
            }
        }
    }
}

// qkv (B,T,3C) -> out (B,T,C); preatt, att (B,NH,T,T) kept for the backward
void attention_forward(float *out, float *preatt, float *att, const float *qkv, int B, int T, int C, int NH) {
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++) {
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *pre = preatt + (((size_t)b * NH + h) * T + t) * T;
                float *a = att + (((size_t)b * NH + h) * T + t) * T;
                float maxv = -FLT_MAX;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = qkv + ((size_t)b * T + t2) * C3 + h * hs + C;
                    float v = 0.0f;
                    for (int i = 0; i < hs; i++) v += q[i] * k[i];
                    v *= scale;
                    pre[t2] = v;
                    if (v > maxv) maxv = v;
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { float e = expf(pre[t2] - maxv); a[t2] = e; sum += e; }
                float inv = 1.0f / sum;
                for (int t2 = 0; t2 < T; t2++) a[t2] = t2 <= t ? a[t2] * inv : 0.0f;
                float *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + ((size_t)b * T + t2) * C3 + h * hs + 2 * C;
                    for (int i = 0; i < hs; i++) o[i] += a[t2] * v[i];
                }
            }
}

// accumulates into dqkv; each (b, h) owns its slices of dqkv, so threads never collide
void attention_backward(float *dqkv, float *dpreatt, float *datt, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH) {
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *a = att + (((size_t)b * NH + h) * T + t) * T;
                float *da = datt + (((size_t)b * NH + h) * T + t) * T;
                float *dpre = dpreatt + (((size_t)b * NH + h) * T + t) * T;
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
                const float *d = dout + ((size_t)b * T + t) * C + h * hs;
                for (int t2 = 0; t2 <= t; t2++) {   // out = att @ v
                    const float *v = qkv + ((size_t)b * T + t2) * C3 + h * hs + 2 * C;
                    float *dv = dqkv + ((size_t)b * T + t2) * C3 + h * hs + 2 * C;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += v[i] * d[i]; dv[i] += a[t2] * d[i]; }
                    da[t2] = s;
                }
                float dot = 0.0f;   // softmax backward
                for (int t2 = 0; t2 <= t; t2++) dot += a[t2] * da[t2];
                for (int t2 = 0; t2 <= t; t2++) dpre[t2] = a[t2] * (da[t2] - dot);
                for (int t2 = 0; t2 <= t; t2++) {   // preatt = q.k * scale
                    const float *k = qkv + ((size_t)b * T + t2) * C3 + h * hs + C;
                    float *dk = dqkv + ((size_t)b * T + t2) * C3 + h * hs + C;
                    float g = dpre[t2] * scale;
                    for (int i = 0; i < hs; i++) { dq[i] += k[i] * g; dk[i] += q[i] * g; }
                }
            }
}

#define GELU_SCALING_FACTOR 0.7978845608028654f   // sqrt(2/pi)
void gelu_forward(float *out, const float *inp, size_t N) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x)));
    }
}

void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += g * dout[i];
    }
}

void residual_forward(float *out, const float *a, const float *b, size_t N) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

// probs over the first V of Vp columns; padded columns get probability 0
void softmax_forward(float *probs, const float *logits, int BT, int V, int Vp) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *l = logits + (size_t)bt * Vp;
        float *p = probs + (size_t)bt * Vp;
        float maxv = -FLT_MAX;
        for (int i = 0; i < V; i++) if (l[i] > maxv) maxv = l[i];
        double sum = 0.0;
        for (int i = 0; i < V; i++) { p[i] = expf(l[i] - maxv); sum += p[i]; }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) p[i] *= inv;
        for (int i = V; i < Vp; i++) p[i] = 0.0f;
    }
}

void crossentropy_forward(float *losses, const float *probs, const int *targets, int BT, int Vp) {
    for (int bt = 0; bt < BT; bt++) losses[bt] = -logf(probs[(size_t)bt * Vp + targets[bt]]);
}

// dlogits = (probs - onehot) * dloss, padded columns 0
void crossentropy_softmax_backward(float *dlogits, const float *probs, const int *targets, float dloss,
                                   int BT, int V, int Vp) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        float *d = dlogits + (size_t)bt * Vp;
        const float *p = probs + (size_t)bt * Vp;
        for (int i = 0; i < V; i++) d[i] += p[i] * dloss;
        d[targets[bt]] -= dloss;
    }
}

// ----------------------------------------------------------------------------
// Hyper-Connection mixing, shared by shc/dhc/mhc. H is (BT, n, C); pre, post (BT, n); res (BT, n, n)

// u = sum_i pre[i] H_i
void hc_premix_forward(float *u, const float *H, const float *pre, int BT, int n, int C) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *h = H + (size_t)bt * n * C, *p = pre + bt * n;
        float *o = u + (size_t)bt * C;
        for (int c = 0; c < C; c++) o[c] = p[0] * h[c];
        for (int i = 1; i < n; i++)
            for (int c = 0; c < C; c++) o[c] += p[i] * h[(size_t)i * C + c];
    }
}

// dH += pre (x) du; dpre = du . H_i (written)
void hc_premix_backward(float *dH, float *dpre, const float *du, const float *H, const float *pre, int BT, int n, int C) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *h = H + (size_t)bt * n * C, *d = du + (size_t)bt * C, *p = pre + bt * n;
        float *dh = dH + (size_t)bt * n * C;
        for (int i = 0; i < n; i++) {
            float s = 0.0f;
            for (int c = 0; c < C; c++) { s += d[c] * h[(size_t)i * C + c]; dh[(size_t)i * C + c] += p[i] * d[c]; }
            dpre[bt * n + i] = s;
        }
    }
}

// H'_i = sum_j res[i][j] H_j + post[i] y
void hc_postmix_forward(float *Hout, const float *H, const float *y, const float *post, const float *res, int BT, int n, int C) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *h = H + (size_t)bt * n * C, *yy = y + (size_t)bt * C;
        const float *r = res + (size_t)bt * n * n, *p = post + bt * n;
        float *o = Hout + (size_t)bt * n * C;
        for (int i = 0; i < n; i++) {
            float *oi = o + (size_t)i * C;
            for (int c = 0; c < C; c++) oi[c] = p[i] * yy[c];
            for (int j = 0; j < n; j++)
                for (int c = 0; c < C; c++) oi[c] += r[i * n + j] * h[(size_t)j * C + c];
        }
    }
}

// dH_j += sum_i res[i][j] dH'_i; dy += sum_i post[i] dH'_i; dpost, dres written
void hc_postmix_backward(float *dH, float *dy, float *dpost, float *dres, const float *dHout, const float *H,
                         const float *y, const float *post, const float *res, int BT, int n, int C) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *h = H + (size_t)bt * n * C, *yy = y + (size_t)bt * C, *d = dHout + (size_t)bt * n * C;
        const float *r = res + (size_t)bt * n * n, *p = post + bt * n;
        float *dh = dH + (size_t)bt * n * C, *dyy = dy + (size_t)bt * C;
        for (int i = 0; i < n; i++) {
            const float *di = d + (size_t)i * C;
            float sp = 0.0f;
            for (int c = 0; c < C; c++) { sp += di[c] * yy[c]; dyy[c] += p[i] * di[c]; }
            dpost[bt * n + i] = sp;
            for (int j = 0; j < n; j++) {
                const float *hj = h + (size_t)j * C;
                float *dhj = dh + (size_t)j * C;
                float rij = r[i * n + j], s = 0.0f;
                for (int c = 0; c < C; c++) { s += di[c] * hj[c]; dhj[c] += rij * di[c]; }
                dres[(size_t)bt * n * n + i * n + j] = s;
            }
        }
    }
}

// ----------------------------------------------------------------------------
// shc: static coefficients (SPEC 2.2). A is (n, n+1): column 0 = a, columns 1.. = A_r;
// H'_j = b_j y + sum_i A[i][1+j] H_i, so res[j][i] = A[i][1+j].

void shc_coeffs_forward(float *pre, float *post, float *res, const float *A, const float *b, int BT, int n) {
    for (int bt = 0; bt < BT; bt++)
        for (int i = 0; i < n; i++) {
            pre[bt * n + i] = A[i * (n + 1)];
            post[bt * n + i] = b[i];
            for (int j = 0; j < n; j++) res[(size_t)bt * n * n + j * n + i] = A[i * (n + 1) + 1 + j];
        }
}

void shc_coeffs_backward(float *dA, float *db, const float *dpre, const float *dpost, const float *dres, int BT, int n) {
    for (int bt = 0; bt < BT; bt++)
        for (int i = 0; i < n; i++) {
            dA[i * (n + 1)] += dpre[bt * n + i];
            db[i] += dpost[bt * n + i];
            for (int j = 0; j < n; j++) dA[i * (n + 1) + 1 + j] += dres[(size_t)bt * n * n + j * n + i];
        }
}

// ----------------------------------------------------------------------------
// dhc: dynamic coefficients (SPEC 2.2). Per stream i: N_i = LNh(H_i);
// At[i][c] = A[i][c] + sa*tanh(N_i . Wa[:,c]), bt[i] = b[i] + sb*tanh(N_i . Wb).
// Kept for the backward: LN mean/rstd per stream, the tanh values; N is recomputed.

typedef struct {
    float *A, *b, *lnw, *lnb, *Wa, *Wb, *sa, *sb;
} DhcParams;

void dhc_coeffs_forward(float *pre, float *post, float *res, float *mean, float *rstd, float *ta, float *tb,
                        const float *H, DhcParams p, int BT, int n, int C) {
    int n1 = n + 1;
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        for (int i = 0; i < n; i++) {
            const float *x = H + ((size_t)bt * n + i) * C;
            float m = 0.0f, v = 0.0f;
            for (int c = 0; c < C; c++) m += x[c];
            m /= C;
            for (int c = 0; c < C; c++) { float d = x[c] - m; v += d * d; }
            float s = 1.0f / sqrtf(v / C + 1e-5f);
            float da[MAX_STREAMS + 1] = {0}, db = 0.0f;
            for (int c = 0; c < C; c++) {
                float nv = (x[c] - m) * s * p.lnw[c] + p.lnb[c];
                for (int q = 0; q < n1; q++) da[q] += nv * p.Wa[c * n1 + q];
                db += nv * p.Wb[c];
            }
            size_t r = (size_t)bt * n + i;
            mean[r] = m;
            rstd[r] = s;
            float *t = ta + r * n1;
            for (int q = 0; q < n1; q++) t[q] = tanhf(da[q]);
            tb[r] = tanhf(db);
            pre[r] = p.A[i * n1] + p.sa[0] * t[0];
            post[r] = p.b[i] + p.sb[0] * tb[r];
            for (int j = 0; j < n; j++) res[(size_t)bt * n * n + j * n + i] = p.A[i * n1 + 1 + j] + p.sa[0] * t[1 + j];
        }
    }
}

// dH += through LNh; parameter grads accumulated. g: scratch (BT*n*(n+2)) of gate gradients.
void dhc_coeffs_backward(float *dH, DhcParams dp, const float *dpre, const float *dpost, const float *dres,
                         const float *H, const float *mean, const float *rstd, const float *ta, const float *tb,
                         DhcParams p, int BT, int n, int C) {
    int n1 = n + 1, ng = n + 2;
    float *g = scratch(1, (size_t)BT * n * ng);
    float sa = p.sa[0], sb = p.sb[0];
    // pass 1, per token: gate gradients, then LayerNorm backward into dH
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        for (int i = 0; i < n; i++) {
            size_t r = (size_t)bt * n + i;
            float *gr = g + r * ng;
            const float *t = ta + r * n1;
            for (int q = 0; q < n1; q++) {
                float dAt = q == 0 ? dpre[r] : dres[(size_t)bt * n * n + (q - 1) * n + i];
                gr[q] = dAt * sa * (1.0f - t[q] * t[q]);
            }
            gr[n1] = dpost[r] * sb * (1.0f - tb[r] * tb[r]);
            const float *x = H + r * C;
            float m = mean[r], s = rstd[r], dn_mean = 0.0f, dn_xhat = 0.0f;
            for (int c = 0; c < C; c++) {
                float dN = gr[n1] * p.Wb[c];
                for (int q = 0; q < n1; q++) dN += gr[q] * p.Wa[c * n1 + q];
                float dn = dN * p.lnw[c];
                dn_mean += dn;
                dn_xhat += dn * (x[c] - m) * s;
            }
            dn_mean /= C;
            dn_xhat /= C;
            float *dx = dH + r * C;
            for (int c = 0; c < C; c++) {
                float dN = gr[n1] * p.Wb[c];
                for (int q = 0; q < n1; q++) dN += gr[q] * p.Wa[c * n1 + q];
                dx[c] += s * (dN * p.lnw[c] - dn_mean - (x[c] - m) * s * dn_xhat);
            }
        }
    }
    // pass 2, per channel: Wa, Wb, LNh weight and bias, summed over tokens in order
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        float dwa[MAX_STREAMS + 1] = {0}, dwb = 0.0f, dlw = 0.0f, dlb = 0.0f;
        for (size_t r = 0; r < (size_t)BT * n; r++) {
            const float *gr = g + r * ng;
            float xhat = (H[r * C + c] - mean[r]) * rstd[r];
            float nv = xhat * p.lnw[c] + p.lnb[c];
            float dN = gr[n1] * p.Wb[c];
            for (int q = 0; q < n1; q++) { dwa[q] += nv * gr[q]; dN += gr[q] * p.Wa[c * n1 + q]; }
            dwb += nv * gr[n1];
            dlw += dN * xhat;
            dlb += dN;
        }
        for (int q = 0; q < n1; q++) dp.Wa[c * n1 + q] += dwa[q];
        dp.Wb[c] += dwb;
        dp.lnw[c] += dlw;
        dp.lnb[c] += dlb;
    }
    // pass 3: the static matrices and the two scalars
    float *dA = dp.A, *db = dp.b;
    double dsa = 0.0, dsb = 0.0;
    for (int bt = 0; bt < BT; bt++)
        for (int i = 0; i < n; i++) {
            size_t r = (size_t)bt * n + i;
            const float *t = ta + r * n1;
            for (int q = 0; q < n1; q++) {
                float dAt = q == 0 ? dpre[r] : dres[(size_t)bt * n * n + (q - 1) * n + i];
                dA[i * n1 + q] += dAt;
                dsa += dAt * t[q];
            }
            db[i] += dpost[r];
            dsb += dpost[r] * tb[r];
        }
    dp.sa[0] += (float)dsa;
    dp.sb[0] += (float)dsb;
}

// ----------------------------------------------------------------------------
// mhc (SPEC 2.3): z = (vec(H) @ phi) / rms(vec(H)); pre = sigmoid, post = 2 sigmoid,
// res = Sinkhorn-Knopp(alpha_res z_res + b_res). The backward recomputes the t_max Sinkhorn
// iterations of each token (O(t_max n^2) work in a small per-thread buffer) instead of storing
// them: storing would cost 2 t_max n^2 floats per token and sublayer, 40x the coefficients.

static void sinkhorn_forward(float *out, const float *X, int n, int iters, float *trace_P, float *trace_s) {
    float M[MAX_STREAMS * MAX_STREAMS], maxv = -FLT_MAX;
    int nn = n * n;
    for (int q = 0; q < nn; q++) if (X[q] > maxv) maxv = X[q];
    for (int q = 0; q < nn; q++) M[q] = expf(X[q] - maxv);
    if (trace_P) memcpy(trace_P, M, nn * sizeof(float));
    for (int it = 0; it < iters; it++) {
        for (int half = 0; half < 2; half++) {
            float s[MAX_STREAMS];
            for (int a = 0; a < n; a++) {
                float sum = 0.0f;
                for (int b = 0; b < n; b++) sum += half == 0 ? M[b * n + a] : M[a * n + b];
                s[a] = sum;
            }
            for (int a = 0; a < n; a++)
                for (int b = 0; b < n; b++) {
                    if (half == 0) M[b * n + a] /= s[a];   // column a
                    else M[a * n + b] /= s[a];             // row a
                }
            if (trace_P) {
                int h = 2 * it + half;
                memcpy(trace_P + (size_t)(h + 1) * nn, M, nn * sizeof(float));
                memcpy(trace_s + (size_t)h * n, s, n * sizeof(float));
            }
        }
    }
    memcpy(out, M, nn * sizeof(float));
}

// dX from dOut, exactly as autograd through the loop; work: (2 iters + 1) n^2 + 2 iters n floats
static void sinkhorn_backward(float *dX, const float *dOut, const float *X, int n, int iters, float *work) {
    int nn = n * n;
    float *P = work, *S = work + (size_t)(2 * iters + 1) * nn;
    float out[MAX_STREAMS * MAX_STREAMS], d[MAX_STREAMS * MAX_STREAMS];
    sinkhorn_forward(out, X, n, iters, P, S);
    memcpy(d, dOut, nn * sizeof(float));
    for (int h = 2 * iters - 1; h >= 0; h--) {
        const float *Ph = P + (size_t)(h + 1) * nn, *s = S + (size_t)h * n;
        int rows = h % 2;   // odd half-steps normalize rows, even ones columns
        for (int a = 0; a < n; a++) {
            float dot = 0.0f;
            for (int b = 0; b < n; b++) { int q = rows ? a * n + b : b * n + a; dot += d[q] * Ph[q]; }
            for (int b = 0; b < n; b++) { int q = rows ? a * n + b : b * n + a; d[q] = (d[q] - dot) / s[a]; }
        }
    }
    for (int q = 0; q < nn; q++) dX[q] = d[q] * P[q];   // through exp (the max shift is a constant)
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// Hres logits of one token from its z
static inline void mhc_res_logits(float *X, const float *z, const float *bias, const float *alpha, int n) {
    for (int q = 0; q < n * n; q++) X[q] = alpha[2] * z[2 * n + q] + bias[2 * n + q];
}

void mhc_coeffs_forward(float *pre, float *post, float *res, float *rms, float *z, const float *H,
                        const float *phi, const float *bias, const float *alpha, int BT, int n, int C, int iters) {
    int m = mhc_width(n), nC = n * C;
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < BT; bt++) {
        const float *x = H + (size_t)bt * nC;
        float acc[MAX_STREAMS * MAX_STREAMS + 2 * MAX_STREAMS] = {0};
        float ss = 0.0f;
        for (int q = 0; q < nC; q++) {     // matmul first, divide after (SPEC 2.3)
            float xv = x[q];
            const float *ph = phi + (size_t)q * m;
            ss += xv * xv;
            for (int k = 0; k < m; k++) acc[k] += xv * ph[k];
        }
        float r = sqrtf(ss / nC + 1e-6f);
        float *zz = z + (size_t)bt * m;
        for (int k = 0; k < m; k++) zz[k] = acc[k] / r;
        rms[bt] = r;
        for (int i = 0; i < n; i++) {
            pre[bt * n + i] = sigmoidf(alpha[0] * zz[i] + bias[i]);
            post[bt * n + i] = 2.0f * sigmoidf(alpha[1] * zz[n + i] + bias[n + i]);
        }
        float X[MAX_STREAMS * MAX_STREAMS];
        mhc_res_logits(X, zz, bias, alpha, n);
        sinkhorn_forward(res + (size_t)bt * n * n, X, n, iters, NULL, NULL);
    }
}

void mhc_coeffs_backward(float *dH, float *dphi, float *dbias, float *dalpha, const float *dpre, const float *dpost,
                         const float *dres, const float *H, const float *pre, const float *post, const float *rms,
                         const float *z, const float *phi, const float *bias, const float *alpha,
                         int BT, int n, int C, int iters) {
    int m = mhc_width(n), nC = n * C;
    float *gt = scratch(1, (size_t)BT * m);   // gradients of the pre-activation logits
    float *dp = scratch(2, (size_t)BT * m);   // gradient of x @ phi
    size_t work_per = (size_t)(2 * iters + 1) * n * n + (size_t)2 * iters * n;
#pragma omp parallel
    {
        float *work = (float *)mallocCheck(work_per * sizeof(float));
#pragma omp for schedule(static)
        for (int bt = 0; bt < BT; bt++) {
            float *g = gt + (size_t)bt * m, *d = dp + (size_t)bt * m;
            const float *zz = z + (size_t)bt * m;
            for (int i = 0; i < n; i++) {
                float s = pre[bt * n + i], p2 = post[bt * n + i];
                g[i] = dpre[bt * n + i] * s * (1.0f - s);
                g[n + i] = dpost[bt * n + i] * p2 * (1.0f - 0.5f * p2);   // d(2 sig)/dt = post (1 - post/2)
            }
            float X[MAX_STREAMS * MAX_STREAMS];
            mhc_res_logits(X, zz, bias, alpha, n);
            sinkhorn_backward(g + 2 * n, dres + (size_t)bt * n * n, X, n, iters, work);
            float r = rms[bt], dr = 0.0f;
            for (int k = 0; k < m; k++) {
                float a = k < n ? alpha[0] : k < 2 * n ? alpha[1] : alpha[2];
                float dz = a * g[k];
                d[k] = dz / r;
                dr -= dz * zz[k] / r;
            }
            const float *x = H + (size_t)bt * nC;
            float *dx = dH + (size_t)bt * nC;
            float kx = dr / (nC * r);
            for (int q = 0; q < nC; q++) {
                const float *ph = phi + (size_t)q * m;
                float s = kx * x[q];
                for (int k = 0; k < m; k++) s += ph[k] * d[k];
                dx[q] += s;
            }
        }
        free(work);
    }
    // dphi += X^T @ dp, rows of phi owned by threads, tokens summed in order
#pragma omp parallel for schedule(static)
    for (int qb = 0; qb < nC; qb += 64) {
        int qe = qb + 64 < nC ? qb + 64 : nC;
        for (int bt = 0; bt < BT; bt++) {
            const float *x = H + (size_t)bt * nC, *d = dp + (size_t)bt * m;
            for (int q = qb; q < qe; q++) {
                float *dph = dphi + (size_t)q * m;
                float xv = x[q];
                for (int k = 0; k < m; k++) dph[k] += xv * d[k];
            }
        }
    }
    double da[3] = {0, 0, 0};
    for (int bt = 0; bt < BT; bt++) {
        const float *g = gt + (size_t)bt * m, *zz = z + (size_t)bt * m;
        for (int k = 0; k < m; k++) {
            dbias[k] += g[k];
            da[k < n ? 0 : k < 2 * n ? 1 : 2] += (double)g[k] * zz[k];
        }
    }
    for (int a = 0; a < 3; a++) dalpha[a] += (float)da[a];
}

// ----------------------------------------------------------------------------
// GPT-2 with Hyper-Connections: parameters, activations, forward, backward, update

#define NUM_ACTIVATION_TENSORS 29
typedef struct {
    float *x0;       // (B,T,C) embedding
    float *H;        // (K+1, B,T,n,C) stream state before every sublayer and after the last
    float *u;        // (K, B,T,C) sublayer inputs (HC modes; residual reads H directly)
    float *y;        // (K, B,T,C) sublayer outputs
    float *ln;       // (K, B,T,C) pre-LayerNorm outputs
    float *ln_mean, *ln_rstd;      // (K, B,T)
    float *qkv;      // (L, B,T,3C)
    float *atty;     // (L, B,T,C)
    float *preatt, *att;           // (L, B,NH,T,T)
    float *fch, *fch_gelu;         // (L, B,T,4C)
    float *pre, *post;             // (K, B,T,n)
    float *res;      // (K, B,T,n,n)
    float *hcn_mean, *hcn_rstd;    // dhc (K, B,T,n)
    float *hc_ta;    // dhc (K, B,T,n,n+1) tanh of the A gates
    float *hc_tb;    // dhc (K, B,T,n)
    float *mhc_rms;  // mhc (K, B,T)
    float *mhc_z;    // mhc (K, B,T,n*n+2n)
    float *hsum;     // (B,T,C) streams summed
    float *lnf, *lnf_mean, *lnf_rstd;
    float *logits, *probs;         // (B,T,Vp)
    float *losses;   // (B,T)
} ActivationTensors;

static void fill_activation_sizes(size_t *s, const GPTHCConfig *c, int B, int T) {
    size_t BT = (size_t)B * T, C = c->channels, L = c->num_layers, K = 2 * L, n = c->n, NH = c->num_heads;
    size_t Vp = c->padded_vocab_size;
    int hc = c->mode != MODE_RESIDUAL, dhc = c->mode == MODE_DHC, mhc = c->mode == MODE_MHC;
    size_t v[NUM_ACTIVATION_TENSORS] = {
        BT * C, (K + 1) * BT * n * C, hc ? K * BT * C : 0, K * BT * C, K * BT * C, K * BT, K * BT,
        L * BT * 3 * C, L * BT * C, L * B * NH * T * T, L * B * NH * T * T, L * BT * 4 * C, L * BT * 4 * C,
        hc ? K * BT * n : 0, hc ? K * BT * n : 0, hc ? K * BT * n * n : 0,
        dhc ? K * BT * n : 0, dhc ? K * BT * n : 0, dhc ? K * BT * n * (n + 1) : 0, dhc ? K * BT * n : 0,
        mhc ? K * BT : 0, mhc ? K * BT * mhc_width(n) : 0,
        BT * C, BT * C, BT, BT, BT * Vp, BT * Vp, BT};
    memcpy(s, v, sizeof(v));
}

static void point_activations(ActivationTensors *a, float *mem, const size_t *sizes) {
    float **ptrs[NUM_ACTIVATION_TENSORS] = {
        &a->x0, &a->H, &a->u, &a->y, &a->ln, &a->ln_mean, &a->ln_rstd, &a->qkv, &a->atty, &a->preatt, &a->att,
        &a->fch, &a->fch_gelu, &a->pre, &a->post, &a->res, &a->hcn_mean, &a->hcn_rstd, &a->hc_ta, &a->hc_tb,
        &a->mhc_rms, &a->mhc_z, &a->hsum, &a->lnf, &a->lnf_mean, &a->lnf_rstd, &a->logits, &a->probs, &a->losses};
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { *ptrs[i] = mem; mem += sizes[i]; }
}

typedef struct {
    GPTHCConfig config;
    ParameterTensors params;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    float *params_memory;
    size_t num_parameters;
    ParameterTensors grads;
    float *grads_memory;
    float *m_memory, *v_memory;
    ActivationTensors acts, grads_acts;
    size_t act_sizes[NUM_ACTIVATION_TENSORS];
    float *acts_memory, *grads_acts_memory;
    size_t num_activations;
    int batch_size, seq_len;   // what the activations were allocated for
    int last_B, last_T;        // of the last forward (the backward runs on it)
    int *inputs, *targets;
    float mean_loss;           // of the last forward with targets, else -1
} GPTHC;

static void gpt_allocate_params(GPTHC *model) {
    fill_param_sizes(model->param_sizes, &model->config);
    model->num_parameters = count_params(&model->config);
    model->params_memory = (float *)callocCheck(model->num_parameters, sizeof(float));
    point_parameters(&model->params, model->params_memory, model->param_sizes);
}

// a fresh model (SPEC.md 'Init', llmc/params.h)
void gpt_build_fresh(GPTHC *model, const GPTHCConfig *cfg, uint64_t seed) {
    memset(model, 0, sizeof(*model));
    model->config = *cfg;
    gpt_allocate_params(model);
    init_params(model->params_memory, model->param_sizes, cfg, seed);
}

void gpt_build_from_checkpoint(GPTHC *model, const char *path) {
    memset(model, 0, sizeof(*model));
    FILE *fp = fopenCheck(path, "rb");
    read_model_header(fp, path, &model->config);
    gpt_allocate_params(model);
    freadCheck(model->params_memory, sizeof(float), model->num_parameters, fp, path);
    fclose(fp);
}

static void gpt_ensure_activations(GPTHC *model, int B, int T) {
    if (model->acts_memory != NULL) {
        if (B > model->batch_size || T > model->seq_len)
            die("internal: forward with B=%d T=%d after allocating for B=%d T=%d", B, T, model->batch_size, model->seq_len);
        return;
    }
    model->batch_size = B;
    model->seq_len = T;
    fill_activation_sizes(model->act_sizes, &model->config, B, T);
    size_t total = 0;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) total += model->act_sizes[i];
    model->num_activations = total;
    model->acts_memory = (float *)mallocCheck(total * sizeof(float));
    point_activations(&model->acts, model->acts_memory, model->act_sizes);
    model->inputs = (int *)mallocCheck((size_t)B * T * sizeof(int));
    model->targets = (int *)mallocCheck((size_t)B * T * sizeof(int));
}

// one sublayer F_k on u (BT, C) -> y; even k attention, odd k MLP
static void sublayer_forward(GPTHC *model, int k, const float *u, int B, int T) {
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params;
    ActivationTensors *a = &model->acts;
    size_t BT = (size_t)B * T, C = c->channels, l = k / 2, NH = c->num_heads;
    float *ln = a->ln + k * BT * C, *mean = a->ln_mean + k * BT, *rstd = a->ln_rstd + k * BT;
    float *y = a->y + k * BT * C;
    if (k % 2 == 0) {
        float *qkv = a->qkv + l * BT * 3 * C, *atty = a->atty + l * BT * C;
        float *preatt = a->preatt + l * B * NH * T * T, *att = a->att + l * B * NH * T * T;
        layernorm_forward(ln, mean, rstd, u, p->ln1w + l * C, p->ln1b + l * C, BT, C);
        matmul_forward(qkv, ln, p->qkvw + l * 3 * C * C, p->qkvb + l * 3 * C, BT, C, 3 * C);
        attention_forward(atty, preatt, att, qkv, B, T, C, NH);
        matmul_forward(y, atty, p->attprojw + l * C * C, p->attprojb + l * C, BT, C, C);
    } else {
        float *fch = a->fch + l * BT * 4 * C, *fchg = a->fch_gelu + l * BT * 4 * C;
        layernorm_forward(ln, mean, rstd, u, p->ln2w + l * C, p->ln2b + l * C, BT, C);
        matmul_forward(fch, ln, p->fcw + l * 4 * C * C, p->fcb + l * 4 * C, BT, C, 4 * C);
        gelu_forward(fchg, fch, BT * 4 * C);
        matmul_forward(y, fchg, p->fcprojw + l * C * 4 * C, p->fcprojb + l * C, BT, 4 * C, C);
    }
}

// accumulates into du (the sublayer input's gradient) and the parameter grads
static void sublayer_backward(GPTHC *model, int k, float *du, const float *dy, const float *u, int B, int T) {
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params, *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    size_t BT = (size_t)B * T, C = c->channels, l = k / 2, NH = c->num_heads;
    float *ln = a->ln + k * BT * C, *mean = a->ln_mean + k * BT, *rstd = a->ln_rstd + k * BT;
    float *dln = ga->ln + k * BT * C;
    if (k % 2 == 0) {
        float *qkv = a->qkv + l * BT * 3 * C, *atty = a->atty + l * BT * C, *att = a->att + l * B * NH * T * T;
        float *dqkv = ga->qkv + l * BT * 3 * C, *datty = ga->atty + l * BT * C;
        float *dpreatt = ga->preatt + l * B * NH * T * T, *datt = ga->att + l * B * NH * T * T;
        matmul_backward(datty, g->attprojw + l * C * C, g->attprojb + l * C, dy, atty, p->attprojw + l * C * C, BT, C, C);
        attention_backward(dqkv, dpreatt, datt, datty, qkv, att, B, T, C, NH);
        matmul_backward(dln, g->qkvw + l * 3 * C * C, g->qkvb + l * 3 * C, dqkv, ln, p->qkvw + l * 3 * C * C, BT, C, 3 * C);
        layernorm_backward(du, g->ln1w + l * C, g->ln1b + l * C, dln, u, p->ln1w + l * C, mean, rstd, BT, C);
    } else {
        float *fch = a->fch + l * BT * 4 * C, *fchg = a->fch_gelu + l * BT * 4 * C;
        float *dfch = ga->fch + l * BT * 4 * C, *dfchg = ga->fch_gelu + l * BT * 4 * C;
        matmul_backward(dfchg, g->fcprojw + l * C * 4 * C, g->fcprojb + l * C, dy, fchg, p->fcprojw + l * C * 4 * C, BT, 4 * C, C);
        gelu_backward(dfch, fch, dfchg, BT * 4 * C);
        matmul_backward(dln, g->fcw + l * 4 * C * C, g->fcb + l * 4 * C, dfch, ln, p->fcw + l * 4 * C * C, BT, C, 4 * C);
        layernorm_backward(du, g->ln2w + l * C, g->ln2b + l * C, dln, u, p->ln2w + l * C, mean, rstd, BT, C);
    }
}

static DhcParams dhc_params(ParameterTensors *p, int k, int n, int C) {
    DhcParams d = {p->hc_A + (size_t)k * n * (n + 1), p->hc_b + (size_t)k * n, p->hc_lnw + (size_t)k * C,
                   p->hc_lnb + (size_t)k * C, p->hc_Wa + (size_t)k * C * (n + 1), p->hc_Wb + (size_t)k * C,
                   p->hc_sa + k, p->hc_sb + k};
    return d;
}

// the coefficients (pre, post, res) of sublayer k from its input state Hk
static void hc_coeffs_forward(GPTHC *model, int k, const float *Hk, int BT) {
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params;
    ActivationTensors *a = &model->acts;
    int n = c->n, C = c->channels, m = mhc_width(n);
    float *pre = a->pre + (size_t)k * BT * n, *post = a->post + (size_t)k * BT * n, *res = a->res + (size_t)k * BT * n * n;
    if (c->mode == MODE_SHC) {
        shc_coeffs_forward(pre, post, res, p->hc_A + (size_t)k * n * (n + 1), p->hc_b + (size_t)k * n, BT, n);
    } else if (c->mode == MODE_DHC) {
        dhc_coeffs_forward(pre, post, res, a->hcn_mean + (size_t)k * BT * n, a->hcn_rstd + (size_t)k * BT * n,
                           a->hc_ta + (size_t)k * BT * n * (n + 1), a->hc_tb + (size_t)k * BT * n, Hk,
                           dhc_params(p, k, n, C), BT, n, C);
    } else {
        mhc_coeffs_forward(pre, post, res, a->mhc_rms + (size_t)k * BT, a->mhc_z + (size_t)k * BT * m, Hk,
                           p->mhc_phi + (size_t)k * n * C * m, p->mhc_bias + (size_t)k * m, p->mhc_alpha + k * 3,
                           BT, n, C, c->sinkhorn_iters);
    }
}

static void hc_coeffs_backward(GPTHC *model, int k, float *dHk, const float *Hk, int BT) {
    const GPTHCConfig *c = &model->config;
    ParameterTensors *p = &model->params, *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    int n = c->n, C = c->channels, m = mhc_width(n);
    size_t o1 = (size_t)k * BT * n, o2 = (size_t)k * BT * n * n;
    const float *dpre = ga->pre + o1, *dpost = ga->post + o1, *dres = ga->res + o2;
    if (c->mode == MODE_SHC) {
        shc_coeffs_backward(g->hc_A + (size_t)k * n * (n + 1), g->hc_b + (size_t)k * n, dpre, dpost, dres, BT, n);
    } else if (c->mode == MODE_DHC) {
        dhc_coeffs_backward(dHk, dhc_params(g, k, n, C), dpre, dpost, dres, Hk, a->hcn_mean + o1, a->hcn_rstd + o1,
                            a->hc_ta + (size_t)k * BT * n * (n + 1), a->hc_tb + o1, dhc_params(p, k, n, C), BT, n, C);
    } else {
        mhc_coeffs_backward(dHk, g->mhc_phi + (size_t)k * n * C * m, g->mhc_bias + (size_t)k * m, g->mhc_alpha + k * 3,
                            dpre, dpost, dres, Hk, a->pre + o1, a->post + o1, a->mhc_rms + (size_t)k * BT,
                            a->mhc_z + (size_t)k * BT * m, p->mhc_phi + (size_t)k * n * C * m,
                            p->mhc_bias + (size_t)k * m, p->mhc_alpha + k * 3, BT, n, C, c->sinkhorn_iters);
    }
}

// targets may be NULL (no loss). B, T may be smaller than at the first call (sampling).
void gpt_forward(GPTHC *model, const int *inputs, const int *targets, int B, int T) {
    const GPTHCConfig *c = &model->config;
    int V = c->vocab_size, Vp = c->padded_vocab_size, C = c->channels, n = c->n, K = 2 * c->num_layers;
    check_batch(c, inputs, targets, B, T);
    gpt_ensure_activations(model, B, T);
    model->last_B = B;
    model->last_T = T;
    memcpy(model->inputs, inputs, (size_t)B * T * sizeof(int));
    if (targets != NULL) memcpy(model->targets, targets, (size_t)B * T * sizeof(int));
    ParameterTensors *p = &model->params;
    ActivationTensors *a = &model->acts;
    size_t BT = (size_t)B * T, S = BT * n * C;   // S: one stream state
    encoder_forward(a->x0, inputs, p->wte, p->wpe, B, T, C);
    for (size_t bt = 0; bt < BT; bt++)           // expand: H^0_i = x0 for every stream
        for (int i = 0; i < n; i++) memcpy(a->H + (bt * n + i) * C, a->x0 + bt * C, C * sizeof(float));
    for (int k = 0; k < K; k++) {
        float *Hk = a->H + k * S, *Hn = a->H + (k + 1) * S, *y = a->y + k * BT * C;
        if (c->mode == MODE_RESIDUAL) {
            sublayer_forward(model, k, Hk, B, T);
            residual_forward(Hn, Hk, y, BT * C);
        } else {
            float *u = a->u + k * BT * C;
            hc_coeffs_forward(model, k, Hk, BT);
            hc_premix_forward(u, Hk, a->pre + k * BT * n, BT, n, C);
            sublayer_forward(model, k, u, B, T);
            hc_postmix_forward(Hn, Hk, y, a->post + k * BT * n, a->res + k * BT * n * n, BT, n, C);
        }
    }
    const float *HK = a->H + K * S;              // reduce: h = sum_i H_i
    for (size_t bt = 0; bt < BT; bt++) {
        float *h = a->hsum + bt * C;
        memcpy(h, HK + bt * n * C, C * sizeof(float));
        for (int i = 1; i < n; i++)
            for (int ch = 0; ch < C; ch++) h[ch] += HK[(bt * n + i) * C + ch];
    }
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->hsum, p->lnfw, p->lnfb, BT, C);
    matmul_forward(a->logits, a->lnf, p->wte, NULL, BT, C, Vp);
    softmax_forward(a->probs, a->logits, BT, V, Vp);
    if (targets != NULL) {
        crossentropy_forward(a->losses, a->probs, targets, BT, Vp);
        double s = 0.0;
        for (size_t i = 0; i < BT; i++) s += a->losses[i];
        model->mean_loss = (float)(s / BT);
    } else {
        model->mean_loss = -1.0f;
    }
}

void gpt_zero_grad(GPTHC *model) {
    if (model->grads_memory != NULL) memset(model->grads_memory, 0, model->num_parameters * sizeof(float));
}

// accumulates the gradient of loss * loss_scale into the parameter grads (loss_scale 1 / the
// number of micro-batches gives the mean over the whole batch)
// last: the step's last micro-batch (the CUDA trainer starts summing over GPUs in it; one process here)
void gpt_backward(GPTHC *model, float loss_scale, int last) {
    if (model->mean_loss == -1.0f) die("internal: backward without a forward with targets");
    const GPTHCConfig *c = &model->config;
    if (model->grads_memory == NULL) {
        model->grads_memory = (float *)callocCheck(model->num_parameters, sizeof(float));
        point_parameters(&model->grads, model->grads_memory, model->param_sizes);
    }
    if (model->grads_acts_memory == NULL) {
        model->grads_acts_memory = (float *)mallocCheck(model->num_activations * sizeof(float));
        point_activations(&model->grads_acts, model->grads_acts_memory, model->act_sizes);
    }
    memset(model->grads_acts_memory, 0, model->num_activations * sizeof(float));
    int B = model->last_B, T = model->last_T;
    int V = c->vocab_size, Vp = c->padded_vocab_size, C = c->channels, n = c->n, K = 2 * c->num_layers;
    size_t BT = (size_t)B * T, S = BT * n * C;
    ParameterTensors *p = &model->params, *g = &model->grads;
    ActivationTensors *a = &model->acts, *ga = &model->grads_acts;
    crossentropy_softmax_backward(ga->logits, a->probs, model->targets, loss_scale / (float)BT, BT, V, Vp);
    matmul_backward(ga->lnf, g->wte, NULL, ga->logits, a->lnf, p->wte, BT, C, Vp);
    layernorm_backward(ga->hsum, g->lnfw, g->lnfb, ga->lnf, a->hsum, p->lnfw, a->lnf_mean, a->lnf_rstd, BT, C);
    float *dHK = ga->H + K * S;
    for (size_t bt = 0; bt < BT; bt++)
        for (int i = 0; i < n; i++)
            for (int ch = 0; ch < C; ch++) dHK[(bt * n + i) * C + ch] += ga->hsum[bt * C + ch];
    for (int k = K - 1; k >= 0; k--) {
        float *Hk = a->H + k * S, *dHk = ga->H + k * S, *dHn = ga->H + (k + 1) * S;
        if (c->mode == MODE_RESIDUAL) {
            residual_forward(dHk, dHk, dHn, S);               // dH^k += dH^{k+1}; dy = dH^{k+1}
            sublayer_backward(model, k, dHk, dHn, Hk, B, T);  // du = dH^k (accumulates)
        } else {
            float *u = a->u + k * BT * C, *du = ga->u + k * BT * C, *dy = ga->y + k * BT * C;
            size_t o1 = k * BT * n, o2 = k * BT * n * n;
            hc_postmix_backward(dHk, dy, ga->post + o1, ga->res + o2, dHn, Hk, a->y + k * BT * C,
                                a->post + o1, a->res + o2, BT, n, C);
            sublayer_backward(model, k, du, dy, u, B, T);
            hc_premix_backward(dHk, ga->pre + o1, du, Hk, a->pre + o1, BT, n, C);
            hc_coeffs_backward(model, k, dHk, Hk, BT);
        }
    }
    for (size_t bt = 0; bt < BT; bt++) {                  // undo the expand: dx0 = sum_i dH^0_i
        float *d = ga->x0 + bt * C;
        for (int i = 0; i < n; i++)
            for (int ch = 0; ch < C; ch++) d[ch] += ga->H[(bt * n + i) * C + ch];
    }
    encoder_backward(g->wte, g->wpe, ga->x0, model->inputs, B, T, C);
}

// global L2 norm of the gradient, summed in fixed chunks so threads don't change it
float gpt_grad_norm(GPTHC *model) {
    size_t P = model->num_parameters, chunk = 1 << 16, nchunks = (P + chunk - 1) / chunk;
    double *part = (double *)mallocCheck(nchunks * sizeof(double));
#pragma omp parallel for schedule(static)
    for (size_t ci = 0; ci < nchunks; ci++) {
        double s = 0.0;
        size_t e = (ci + 1) * chunk < P ? (ci + 1) * chunk : P;
        for (size_t i = ci * chunk; i < e; i++) s += (double)model->grads_memory[i] * model->grads_memory[i];
        part[ci] = s;
    }
    double total = 0.0;
    for (size_t ci = 0; ci < nchunks; ci++) total += part[ci];
    free(part);
    return (float)sqrt(total);
}

// AdamW (SPEC.md section 3, llm.c's update); t is the 1-based step; grads scaled by grad_scale
void gpt_update(GPTHC *model, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)callocCheck(model->num_parameters, sizeof(float));
        model->v_memory = (float *)callocCheck(model->num_parameters, sizeof(float));
    }
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAMETER_TENSORS; ti++) {
        size_t sz = model->param_sizes[ti];
        float wd = param_decays(ti) ? weight_decay : 0.0f;
        float *p = model->params_memory + off, *g = model->grads_memory + off;
        float *m = model->m_memory + off, *v = model->v_memory + off;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < sz; i++) {
            float gi = g[i] * grad_scale;
            float mi = beta1 * m[i] + (1.0f - beta1) * gi;
            float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
        }
        off += sz;
    }
}

void gpt_free(GPTHC *model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->m_memory);
    free(model->v_memory);
    free(model->acts_memory);
    free(model->grads_acts_memory);
    free(model->inputs);
    free(model->targets);
}

// ----------------------------------------------------------------------------
// diagnostics (SPEC.md section 4) of the last forward's first BT tokens: gains, mean mappings,
// connection matrix (llmc/model_common.h)

void gpt_diagnostics(GPTHC *model, int BT, Diagnostics *d) {
    int hc = model->config.mode != MODE_RESIDUAL;
    size_t ld = (size_t)model->last_B * model->last_T;   // the coefficients are (K, last B*T, ...)
    compute_diagnostics(d, hc ? model->acts.pre : NULL, hc ? model->acts.post : NULL, hc ? model->acts.res : NULL, BT, ld);
}

// ----------------------------------------------------------------------------
// sampling

// generates gen_tokens tokens after <|endoftext|> and prints them
void gpt_sample(GPTHC *model, const Tokenizer *tok, uint64_t *rng, int gen_tokens) {
    int T = model->seq_len, Vp = model->config.padded_vocab_size, V = model->config.vocab_size;
    if (gen_tokens > T) gen_tokens = T;
    int *toks = (int *)mallocCheck((size_t)T * sizeof(int));
    int eot = tok->init_ok ? tok->eot_token : 50256;
    if (eot >= V) eot = 0;
    toks[0] = eot;
    printf("generating:\n---\n");
    for (int t = 1; t < gen_tokens; t++) {
        gpt_forward(model, toks, NULL, 1, t);
        const float *probs = model->acts.probs + (size_t)(t - 1) * Vp;
        toks[t] = sample_mult(probs, V, rng_uniform(rng));
        tokenizer_print(tok, (uint32_t)toks[t]);
        fflush(stdout);
    }
    printf("\n---\n");
    free(toks);
}

// ----------------------------------------------------------------------------
// the interface llmc/train_main.h drives (the CUDA trainer implements the same functions)

// host pointers to the fp32 parameters and AdamW moments (NULL moments before the first update)
void gpt_host_state(GPTHC *model, const float **params, const float **m, const float **v) {
    *params = model->params_memory;
    *m = model->m_memory;
    *v = model->v_memory;
}

// recomputation (-r) is the CUDA trainer's memory saving; this trainer keeps every state (same results)
void gpt_set_recompute(GPTHC *model, int Lr) { (void)model; (void)Lr; }
int gpt_recompute(const GPTHC *model) { (void)model; return 1; }

void gpt_set_moments(GPTHC *model, const float *m, const float *v) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)mallocCheck(model->num_parameters * sizeof(float));
        model->v_memory = (float *)mallocCheck(model->num_parameters * sizeof(float));
    }
    memcpy(model->m_memory, m, model->num_parameters * sizeof(float));
    memcpy(model->v_memory, v, model->num_parameters * sizeof(float));
}

static void gpt_print_report(GPTHC *model, int steps, double total_ms) {
    size_t bytes = (model->num_parameters * 4 + 2 * model->num_activations) * sizeof(float);
    printf("model memory (params, grads, AdamW, activations and their grads): %.0f MiB\n", bytes / 1048576.0);
}

static void gpt_step_done(GPTHC *model, int timed) {}

// the CPU trainer is one process: data parallel runs need the CUDA trainer (NCCL)
static void gpt_multi_init(int *world, int *rank, int gpus_per_node, const char *rendezvous, int zero) {
    if (*world > 1 || *rank > 0 || rendezvous != NULL)
        die("-pn/-pr/-pi: training over several processes needs the CUDA trainer (./train_gpt_hcu)");
    *world = 1;
    *rank = 0;
}
static void gpt_multi_finish(void) {}
static void gpt_sync_grads(GPTHC *model) {}   // one process: the gradients are complete
static void multi_sum(double *x, int n) {}    // one process: its values are the sums

static const char *gpt_device_description(void) {
    static char buf[64];
    int threads = 1;
#ifdef OMP
    threads = omp_get_max_threads();
#endif
    snprintf(buf, sizeof buf, "CPU, fp32, %d OpenMP threads", threads);
    return buf;
}

#ifndef TESTING
#define TRAINER_NAME "train_gpt_hc"
#include "llmc/train_main.h"
#endif
