/*
Small pieces both trainers share: the learning-rate schedule, sampling from probabilities, and
the forward/backward gains of the residual mappings (SPEC.md section 4).
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

// gains of M = res (H'_i = sum_j M[i][j] H_j) per sublayer and of the composite M_k ... M_0,
// per token, averaged over BT tokens; res is (K, BT, n, n) on the host
static void compute_gains(const GPTHCConfig *c, const float *res, int BT, double *fwd, double *bwd, double *cfwd, double *cbwd) {
    int n = c->n, K = 2 * c->num_layers;
    for (int k = 0; k < K; k++) fwd[k] = bwd[k] = cfwd[k] = cbwd[k] = 0.0;
    if (c->mode == MODE_RESIDUAL) {   // M = [1] for every sublayer
        for (int k = 0; k < K; k++) fwd[k] = bwd[k] = cfwd[k] = cbwd[k] = 1.0;
        return;
    }
    for (int bt = 0; bt < BT; bt++) {
        double P[MAX_STREAMS * MAX_STREAMS], Q[MAX_STREAMS * MAX_STREAMS];
        for (int q = 0; q < n * n; q++) P[q] = (q / n == q % n);
        for (int k = 0; k < K; k++) {
            const float *M = res + ((size_t)k * BT + bt) * n * n;
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
            }
            fwd[k] += f / BT; bwd[k] += b / BT; cfwd[k] += cf / BT; cbwd[k] += cb / BT;
        }
    }
}

#endif
