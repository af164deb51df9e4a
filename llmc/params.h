/*
The parameter tensors (fp32, one allocation, pointers in file order) and their initialization
(SPEC.md section 1 'Init' and the inits of section 2), shared by both trainers: the same seed
gives the same weights on the CPU and on the GPU (the CUDA trainer initializes on the host).
*/
#ifndef GPT_HC_PARAMS_H
#define GPT_HC_PARAMS_H

#include <math.h>
#include "gpt_hc_formats.h"
#include "rand.h"

typedef struct {
    float *wte, *wpe, *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b;
    float *fcw, *fcb, *fcprojw, *fcprojb, *lnfw, *lnfb;
    float *hc_A, *hc_b, *hc_lnw, *hc_lnb, *hc_Wa, *hc_Wb, *hc_sa, *hc_sb;
    float *mhc_phi, *mhc_bias, *mhc_alpha;
} ParameterTensors;

// carve one allocation into the tensors (absent ones get a valid pointer to nothing)
static void point_parameters(ParameterTensors *p, float *mem, const size_t *sizes) {
    float **ptrs[NUM_PARAMETER_TENSORS] = {
        &p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb, &p->ln2w, &p->ln2b,
        &p->fcw, &p->fcb, &p->fcprojw, &p->fcprojb, &p->lnfw, &p->lnfb,
        &p->hc_A, &p->hc_b, &p->hc_lnw, &p->hc_lnb, &p->hc_Wa, &p->hc_Wb, &p->hc_sa, &p->hc_sb,
        &p->mhc_phi, &p->mhc_bias, &p->mhc_alpha};
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { *ptrs[i] = mem; mem += sizes[i]; }
}

// base weights from one RNG stream in file order, identical in every mode; HC/mHC parameters
// are deterministic. params must be zeroed.
static void init_params(float *params, const size_t *sizes, const GPTHCConfig *c, uint64_t seed) {
    ParameterTensors pt;
    ParameterTensors *p = &pt;
    point_parameters(p, params, sizes);
    int L = c->num_layers, C = c->channels, n = c->n, K = 2 * L;
    uint64_t rng = seed;
    float proj_std = 0.02f / sqrtf(2.0f * L);
    rng_normal_fill(&rng, p->wte, sizes[P_WTE], 0.0f, 0.02f);
    memset(p->wte + (size_t)c->vocab_size * C, 0, (size_t)(c->padded_vocab_size - c->vocab_size) * C * sizeof(float));
    rng_normal_fill(&rng, p->wpe, sizes[P_WPE], 0.0f, 0.02f);
    rng_normal_fill(&rng, p->qkvw, sizes[P_QKVW], 0.0f, 0.02f);
    rng_normal_fill(&rng, p->attprojw, sizes[P_ATTPROJW], 0.0f, proj_std);
    rng_normal_fill(&rng, p->fcw, sizes[P_FCW], 0.0f, 0.02f);
    rng_normal_fill(&rng, p->fcprojw, sizes[P_FCPROJW], 0.0f, proj_std);
    for (size_t i = 0; i < (size_t)L * C; i++) { p->ln1w[i] = 1.0f; p->ln2w[i] = 1.0f; }
    for (int i = 0; i < C; i++) p->lnfw[i] = 1.0f;
    if (c->mode == MODE_SHC || c->mode == MODE_DHC) {
        for (int k = 0; k < K; k++) {
            float *A = p->hc_A + (size_t)k * n * (n + 1);
            A[(k % n) * (n + 1)] = 1.0f;                                   // a = e_{k mod n}
            for (int i = 0; i < n; i++) A[i * (n + 1) + 1 + i] = 1.0f;     // A_r = I
            for (int i = 0; i < n; i++) p->hc_b[k * n + i] = 1.0f;
        }
    }
    if (c->mode == MODE_DHC) {
        for (size_t i = 0; i < (size_t)K * C; i++) p->hc_lnw[i] = 1.0f;
        for (int k = 0; k < K; k++) { p->hc_sa[k] = 0.01f; p->hc_sb[k] = 0.01f; }
    }
    if (c->mode == MODE_MHC) {
        int m = mhc_width(n);
        for (int k = 0; k < K; k++) {
            float *b = p->mhc_bias + (size_t)k * m;
            b[k % n] = 1.0f;                                               // b_pre = e_{k mod n}
            for (int i = 0; i < n; i++) b[2 * n + i * n + i] = 1.0f;       // b_res = I, b_post = 0
            for (int a = 0; a < 3; a++) p->mhc_alpha[k * 3 + a] = 0.01f;
        }
    }
}

#endif
