/*
The C side of docs/FORMATS.md: model config, parameter layout, model checkpoints and optimizer
state. Shared by train_gpt_hc.c, train_gpt_hc.cu and the tests. Readers reject what they cannot
read with a one-line error; writers write NAME.tmp and rename it.
*/
#ifndef GPT_HC_FORMATS_H
#define GPT_HC_FORMATS_H

#include <stdint.h>
#include "utils.h"

#define MODEL_MAGIC 20261101
#define MODEL_VERSION 1
#define STATE_MAGIC 20261102
#define STATE_VERSION 1
#define DEBUG_MAGIC 20261103
#define DEBUG_VERSION 1

enum { MODE_RESIDUAL = 0, MODE_SHC = 1, MODE_DHC = 2, MODE_MHC = 3, NUM_MODES = 4 };
static const char *MODE_NAMES[NUM_MODES] __attribute__((unused)) = {"residual", "shc", "dhc", "mhc"};
#define MAX_STREAMS 8

static inline int mode_from_name(const char *s) {
    for (int i = 0; i < NUM_MODES; i++) if (strcmp(s, MODE_NAMES[i]) == 0) return i;
    return -1;
}

typedef struct {
    int max_seq_len;       // rows of wpe
    int vocab_size;        // V, e.g. 50257
    int padded_vocab_size; // Vp: V rounded up to a multiple of 128
    int num_layers;        // L (2L sublayers)
    int num_heads;         // NH
    int channels;          // C
    int mode;              // MODE_*
    int n;                 // expansion rate (streams); 1 for residual
    int sinkhorn_iters;    // t_max for mhc
} GPTHCConfig;

// the parameter tensors, in file order; absent ones (other modes) have size 0
enum {
    P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN2W, P_LN2B,
    P_FCW, P_FCB, P_FCPROJW, P_FCPROJB, P_LNFW, P_LNFB,
    P_HC_A, P_HC_B, P_HC_LNW, P_HC_LNB, P_HC_WA, P_HC_WB, P_HC_SA, P_HC_SB,
    P_MHC_PHI, P_MHC_BIAS, P_MHC_ALPHA,
    NUM_PARAMETER_TENSORS
};
static const char *PARAM_NAMES[NUM_PARAMETER_TENSORS] __attribute__((unused)) = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
    "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
    "hc_A", "hc_b", "hc_lnw", "hc_lnb", "hc_Wa", "hc_Wb", "hc_sa", "hc_sb",
    "mhc_phi", "mhc_bias", "mhc_alpha"};

// weight decay applies to the 2-D matrices of the base transformer only (SPEC.md section 3)
static inline int param_decays(int i) {
    return i == P_WTE || i == P_WPE || i == P_QKVW || i == P_ATTPROJW || i == P_FCW || i == P_FCPROJW;
}

static inline int mhc_width(int n) { return n * n + 2 * n; }   // [pre n | post n | res n*n]

static inline void fill_param_sizes(size_t *sizes, const GPTHCConfig *c) {
    size_t Vp = c->padded_vocab_size, C = c->channels, L = c->num_layers, maxT = c->max_seq_len;
    size_t K = 2 * L, n = c->n;
    memset(sizes, 0, NUM_PARAMETER_TENSORS * sizeof(size_t));
    sizes[P_WTE] = Vp * C;
    sizes[P_WPE] = maxT * C;
    sizes[P_LN1W] = L * C;
    sizes[P_LN1B] = L * C;
    sizes[P_QKVW] = L * 3 * C * C;
    sizes[P_QKVB] = L * 3 * C;
    sizes[P_ATTPROJW] = L * C * C;
    sizes[P_ATTPROJB] = L * C;
    sizes[P_LN2W] = L * C;
    sizes[P_LN2B] = L * C;
    sizes[P_FCW] = L * 4 * C * C;
    sizes[P_FCB] = L * 4 * C;
    sizes[P_FCPROJW] = L * C * 4 * C;
    sizes[P_FCPROJB] = L * C;
    sizes[P_LNFW] = C;
    sizes[P_LNFB] = C;
    if (c->mode == MODE_SHC || c->mode == MODE_DHC) {
        sizes[P_HC_A] = K * n * (n + 1);
        sizes[P_HC_B] = K * n;
    }
    if (c->mode == MODE_DHC) {
        sizes[P_HC_LNW] = K * C;
        sizes[P_HC_LNB] = K * C;
        sizes[P_HC_WA] = K * C * (n + 1);
        sizes[P_HC_WB] = K * C;
        sizes[P_HC_SA] = K;
        sizes[P_HC_SB] = K;
    }
    if (c->mode == MODE_MHC) {
        sizes[P_MHC_PHI] = K * n * C * mhc_width(n);
        sizes[P_MHC_BIAS] = K * mhc_width(n);
        sizes[P_MHC_ALPHA] = K * 3;
    }
}

static inline size_t count_params(const GPTHCConfig *c) {
    size_t sizes[NUM_PARAMETER_TENSORS], total = 0;
    fill_param_sizes(sizes, c);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) total += sizes[i];
    return total;
}

// NULL if the config is possible, else a reason
static inline const char *config_problem(const GPTHCConfig *c) {
    static char why[256];
    if (c->mode < 0 || c->mode >= NUM_MODES) { snprintf(why, sizeof why, "unknown residual mode id %d", c->mode); return why; }
    if (c->max_seq_len < 1 || c->max_seq_len > (1 << 20)) { snprintf(why, sizeof why, "max_seq_len %d out of range", c->max_seq_len); return why; }
    if (c->vocab_size < 1 || c->vocab_size > (1 << 24)) { snprintf(why, sizeof why, "vocab size %d out of range", c->vocab_size); return why; }
    if (c->padded_vocab_size != (c->vocab_size + 127) / 128 * 128) {
        snprintf(why, sizeof why, "padded vocab %d is not V=%d rounded up to 128", c->padded_vocab_size, c->vocab_size); return why;
    }
    if (c->num_layers < 1 || c->num_layers > 1024) { snprintf(why, sizeof why, "num_layers %d out of range", c->num_layers); return why; }
    if (c->channels < 1 || c->channels > (1 << 16) || c->num_heads < 1 || c->channels % c->num_heads != 0) {
        snprintf(why, sizeof why, "channels %d not divisible by heads %d", c->channels, c->num_heads); return why;
    }
    if (c->mode == MODE_RESIDUAL && c->n != 1) { snprintf(why, sizeof why, "residual mode requires n = 1, got %d", c->n); return why; }
    if (c->n < 1 || c->n > MAX_STREAMS) { snprintf(why, sizeof why, "expansion rate n=%d out of range 1..%d", c->n, MAX_STREAMS); return why; }
    if (c->mode == MODE_MHC && (c->sinkhorn_iters < 1 || c->sinkhorn_iters > 1000)) {
        snprintf(why, sizeof why, "sinkhorn iterations %d out of range 1..1000", c->sinkhorn_iters); return why;
    }
    return NULL;
}

// ----------------------------------------------------------------------------
// model checkpoint

static inline void write_model_file(const char *path, const GPTHCConfig *c, const float *params) {
    size_t P = count_params(c);
    int header[256] = {0};
    header[0] = MODEL_MAGIC; header[1] = MODEL_VERSION;
    header[2] = c->max_seq_len; header[3] = c->vocab_size; header[4] = c->num_layers;
    header[5] = c->num_heads; header[6] = c->channels; header[7] = c->padded_vocab_size;
    header[8] = c->mode; header[9] = c->n; header[10] = c->sinkhorn_iters; header[11] = 0;
    header[12] = (int)(uint32_t)(P & 0xFFFFFFFFu); header[13] = (int)(uint32_t)(P >> 32);
    char tmp[4200];
    if (strlen(path) > 4000) die("path too long: %s", path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = fopenCheck(tmp, "wb");
    fwriteCheck(header, sizeof(int), 256, fp, tmp);
    fwriteCheck(params, sizeof(float), P, fp, tmp);
    fcloseCheck(fp, tmp);
    rename_check(tmp, path);
}

// reads and validates the header; leaves fp at the first parameter; returns P
static inline size_t read_model_header(FILE *fp, const char *path, GPTHCConfig *c) {
    int h[256];
    long size = file_size_of(fp);
    if (size < 1024) die("%s: truncated header (%ld bytes), not a gpt_hc model checkpoint", path, size);
    freadCheck(h, sizeof(int), 256, fp, path);
    if (h[0] != MODEL_MAGIC) die("%s: bad magic %d (not a gpt_hc model checkpoint)", path, h[0]);
    if (h[1] != MODEL_VERSION) die("%s: unsupported checkpoint version %d (this build reads %d)", path, h[1], MODEL_VERSION);
    c->max_seq_len = h[2]; c->vocab_size = h[3]; c->num_layers = h[4]; c->num_heads = h[5];
    c->channels = h[6]; c->padded_vocab_size = h[7]; c->mode = h[8]; c->n = h[9]; c->sinkhorn_iters = h[10];
    if (h[11] != 0) die("%s: unsupported parameter dtype %d (only fp32 = 0)", path, h[11]);
    const char *why = config_problem(c);
    if (why) die("%s: impossible config: %s", path, why);
    size_t P = (size_t)(uint32_t)h[12] | ((size_t)(uint32_t)h[13] << 32);
    if (P != count_params(c)) die("%s: header says %zu parameters, the config implies %zu", path, P, count_params(c));
    if ((size_t)size != 1024 + 4 * P) die("%s: %ld bytes, expected %zu (truncated?)", path, size, 1024 + 4 * P);
    return P;
}

// ----------------------------------------------------------------------------
// optimizer state

typedef struct {
    int step;
    size_t num_params;
    int shard_index;
    int64_t shard_pos;
    uint64_t rng_state;
    int num_processes;
} OptimizerStateHeader;

static inline void write_state_file(const char *path, const OptimizerStateHeader *s, const float *m, const float *v) {
    int h[256] = {0};
    h[0] = STATE_MAGIC; h[1] = STATE_VERSION; h[2] = s->step;
    h[3] = (int)(uint32_t)(s->num_params & 0xFFFFFFFFu); h[4] = (int)(uint32_t)(s->num_params >> 32);
    h[5] = s->shard_index;
    h[6] = (int)(uint32_t)((uint64_t)s->shard_pos & 0xFFFFFFFFu); h[7] = (int)(uint32_t)((uint64_t)s->shard_pos >> 32);
    h[8] = (int)(uint32_t)(s->rng_state & 0xFFFFFFFFu); h[9] = (int)(uint32_t)(s->rng_state >> 32);
    h[10] = s->num_processes;
    char tmp[4200];
    if (strlen(path) > 4000) die("path too long: %s", path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = fopenCheck(tmp, "wb");
    fwriteCheck(h, sizeof(int), 256, fp, tmp);
    fwriteCheck(m, sizeof(float), s->num_params, fp, tmp);
    fwriteCheck(v, sizeof(float), s->num_params, fp, tmp);
    fcloseCheck(fp, tmp);
    rename_check(tmp, path);
}

// m and v must hold expected_params floats
static inline void read_state_file(const char *path, size_t expected_params, OptimizerStateHeader *s, float *m, float *v) {
    FILE *fp = fopenCheck(path, "rb");
    long size = file_size_of(fp);
    int h[256];
    if (size < 1024) die("%s: truncated header, not a gpt_hc optimizer state", path);
    freadCheck(h, sizeof(int), 256, fp, path);
    if (h[0] != STATE_MAGIC) die("%s: bad magic %d (not a gpt_hc optimizer state)", path, h[0]);
    if (h[1] != STATE_VERSION) die("%s: unsupported state version %d (this build reads %d)", path, h[1], STATE_VERSION);
    s->step = h[2];
    s->num_params = (size_t)(uint32_t)h[3] | ((size_t)(uint32_t)h[4] << 32);
    s->shard_index = h[5];
    s->shard_pos = (int64_t)((uint64_t)(uint32_t)h[6] | ((uint64_t)(uint32_t)h[7] << 32));
    s->rng_state = (uint64_t)(uint32_t)h[8] | ((uint64_t)(uint32_t)h[9] << 32);
    s->num_processes = h[10];
    if (s->num_params != expected_params) die("%s: holds %zu parameters, the model has %zu", path, s->num_params, expected_params);
    if (s->step < 0 || s->shard_index < 0 || s->shard_pos < 0) die("%s: corrupt header (negative step or position)", path);
    if ((size_t)size != 1024 + 8 * expected_params) die("%s: %ld bytes, expected %zu (truncated?)", path, size, 1024 + 8 * expected_params);
    freadCheck(m, sizeof(float), expected_params, fp, path);
    freadCheck(v, sizeof(float), expected_params, fp, path);
    fclose(fp);
}

#endif
