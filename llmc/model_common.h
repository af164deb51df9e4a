/*
Small pieces both trainers share: the learning-rate schedule, sampling from probabilities, and
the diagnostics of the residual mappings (SPEC.md section 4: gains, mean mappings, and the
unfolded connection matrix that the HC paper visualizes).
*/
#ifndef GPT_HC_MODEL_COMMON_H
#define GPT_HC_MODEL_COMMON_H

#include <math.h>
#include "gpt_hc_formats.h"

// a batch both trainers accept: T within the model's context, every token id in the vocabulary
// (targets may be NULL)
static void check_batch(const GPTHCConfig *c, const int *inputs, const int *targets, int B, int T) {
    if (T > c->max_seq_len) die("sequence length %d exceeds the model's max_seq_len %d", T, c->max_seq_len);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->vocab_size) die("input token id %d out of range [0, %d)", inputs[i], c->vocab_size);
        if (targets != NULL && (targets[i] < 0 || targets[i] >= c->vocab_size))
            die("target token id %d out of range [0, %d)", targets[i], c->vocab_size);
    }
}

// linear warmup, then cosine decay to lr * final_frac (llm.c)
static float lr_at(int step, int max_steps, float lr, int warmup, float final_frac) {
    if (step < warmup) return lr * (step + 1) / warmup;
    if (max_steps <= warmup) return lr;
    float ratio = (float)(step - warmup) / (float)(max_steps - warmup);
    if (ratio > 1.0f) ratio = 1.0f;
    float coeff = 0.5f * (1.0f + cosf((float)M_PI * ratio));
    float min_lr = lr * final_frac;
    return min_lr + coeff * (lr - min_lr);
}

static int sample_mult(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += probs[i]; if (coin < cdf) return i; }
    return n - 1;
}

// SPEC.md section 4 diagnostics of one batch, each averaged over its tokens. Sublayer k maps the
// state by M_k = res (H'_i = sum_j M[i][j] H_j), reads u = sum_i pre[i] H_i, adds post[i] y.
typedef struct {
    int K, n;
    size_t count;                      // doubles in the one allocation below
    double *fwd, *bwd, *cfwd, *cbwd;   // (K) gains of M_k and of the composite M_k ... M_0
    double *pre, *post;                // (K, n) H_pre, H_post (shc/dhc: a, b)
    double *res, *comp;                // (K, n, n) M_k and M_k ... M_0
    double *conn;                      // (K+1, K+1) the unfolded network: row k (row K: the reduced
                                       // state h) weighs source m, 0 = embedding, 1+j = output of sublayer j
} Diagnostics;

static void diagnostics_alloc(Diagnostics *d, const GPTHCConfig *c) {
    d->K = 2 * c->num_layers;
    d->n = c->n;
    size_t K = d->K, n = d->n;
    d->count = 4 * K + 2 * K * n + 2 * K * n * n + (K + 1) * (K + 1);
    d->fwd = (double *)mallocCheck(d->count * sizeof(double));
    d->bwd = d->fwd + K; d->cfwd = d->bwd + K; d->cbwd = d->cfwd + K;
    d->pre = d->cbwd + K; d->post = d->pre + K * n;
    d->res = d->post + K * n; d->comp = d->res + K * n * n;
    d->conn = d->comp + K * n * n;
}

static void diagnostics_free(Diagnostics *d) { free(d->fwd); }

// of the first BT of ld tokens: pre, post (K, ld, n) and res (K, ld, n, n) on the host; NULL in
// residual mode (all 1)
static void compute_diagnostics(Diagnostics *d, const float *pre, const float *post, const float *res, int BT, size_t ld) {
    int n = d->n, K = d->K, S = K + 1;
    if ((size_t)BT > ld) die("internal: diagnostics of %d tokens out of %zu", BT, ld);
    memset(d->fwd, 0, d->count * sizeof(double));
    if (res == NULL) {   // residual: M = [1], u_k = x0 + y_0 + ... + y_{k-1}
        for (int k = 0; k < K; k++) d->fwd[k] = d->bwd[k] = d->cfwd[k] = d->cbwd[k] = d->pre[k] = d->post[k] = d->res[k] = d->comp[k] = 1.0;
        for (int k = 0; k <= K; k++)
            for (int m = 0; m <= k; m++) d->conn[k * S + m] = 1.0;
        return;
    }
    double *W = (double *)mallocCheck(2 * (size_t)n * S * sizeof(double));   // stream i = sum_m W[i][m] source m
    for (int bt = 0; bt < BT; bt++) {
        double P[MAX_STREAMS * MAX_STREAMS], Q[MAX_STREAMS * MAX_STREAMS];
        for (int q = 0; q < n * n; q++) P[q] = (q / n == q % n);
        double *Wa = W, *Wb = W + (size_t)n * S;
        for (int i = 0; i < n; i++) { Wa[i * S] = 1.0; }   // H^0_i = x0
        for (int k = 0; k < K; k++) {
            const float *M = res + (k * ld + bt) * n * n;
            const float *pr = pre + (k * ld + bt) * n, *po = post + (k * ld + bt) * n;
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++) {
                    double s = 0.0;
                    for (int l = 0; l < n; l++) s += M[i * n + l] * P[l * n + j];
                    Q[i * n + j] = s;
                }
            memcpy(P, Q, sizeof(Q));
            double f = 0, b = 0, cf = 0, cb = 0;
            for (int i = 0; i < n; i++) {
                double rs = 0, cs = 0, crs = 0, ccs = 0;
                for (int j = 0; j < n; j++) { rs += M[i * n + j]; cs += M[j * n + i]; crs += P[i * n + j]; ccs += P[j * n + i]; }
                f = fmax(f, fabs(rs)); b = fmax(b, fabs(cs)); cf = fmax(cf, fabs(crs)); cb = fmax(cb, fabs(ccs));
                d->pre[k * n + i] += pr[i] / BT;
                d->post[k * n + i] += po[i] / BT;
                for (int j = 0; j < n; j++) { d->res[(k * n + i) * n + j] += M[i * n + j] / BT; d->comp[(k * n + i) * n + j] += P[i * n + j] / BT; }
            }
            d->fwd[k] += f / BT; d->bwd[k] += b / BT; d->cfwd[k] += cf / BT; d->cbwd[k] += cb / BT;
            // u_k = sum_i pre[i] H_i; then H'_i = sum_j M[i][j] H_j + post[i] y_k (sources 0..k+1)
            for (int i = 0; i < n; i++)
                for (int m = 0; m <= k; m++) d->conn[k * S + m] += pr[i] * Wa[i * S + m] / BT;
            for (int i = 0; i < n; i++) {
                for (int m = 0; m <= k; m++) {
                    double s = 0.0;
                    for (int j = 0; j < n; j++) s += M[i * n + j] * Wa[j * S + m];
                    Wb[i * S + m] = s;
                }
                Wb[i * S + k + 1] = po[i];
            }
            double *t = Wa; Wa = Wb; Wb = t;
        }
        for (int i = 0; i < n; i++)   // h = sum_i H_i
            for (int m = 0; m <= K; m++) d->conn[K * S + m] += Wa[i * S + m] / BT;
    }
    free(W);
}

#endif
