/*
Tests of the CPU trainer (run by `make test`):
 1. against the PyTorch float64 dumps in data/ref (scripts/reference.py), for residual, shc n=4,
    dhc n=4, mhc n=4, mhc n=2: logits, loss, every parameter gradient (max abs and relative
    error per tensor), every sublayer's (pre, post, res) coefficients, and the losses of 10
    AdamW steps;
 2. finite differences on the largest-gradient entries of every HC/mHC tensor;
 3. gradient accumulation: two half batches give the gradient of the whole batch;
 4. the command line (./train_gpt_hc): resuming from a checkpoint is bit-exact, and bad input
    (flags, shards, checkpoints) ends with a one-line error and a non-zero exit;
 5. --multi-gpu (on a machine with 2 GPUs, GPT_HC_TRAINER=./train_gpt_hcu[_fp32]): 20 steps on
    2 GPUs equal 20 steps on 1 GPU with the same total batch in every mode, with and without ZeRO-1, and
    checkpoints move between 1 and 2 GPUs and to the CPU trainer (test_multi_gpu below).
Tolerances: fp32 against float64 over this small model lands near 1e-6 relative; we allow
1e-4 relative to each tensor's largest reference value (two orders of headroom; a wrong formula
is off by O(1)). Prints 'N passed, N failed' last.
*/
#define TESTING
#include "train_gpt_hc.c"
#include "llmc/test_report.h"
#include <sys/wait.h>



typedef struct {
    int B, T, S, Vp, n, K;
    size_t P;
    double hyper[8];
    int *inputs, *targets;
    double *losses;
    float *logits, *grads, *coeffs;
} DebugState;

static void read_debug(DebugState *d, const char *path, size_t expected_P) {
    FILE *fp = fopenCheck(path, "rb");
    int h[256];
    freadCheck(h, sizeof(int), 256, fp, path);
    if (h[0] != DEBUG_MAGIC || h[1] != DEBUG_VERSION) die("%s: bad debug-state magic/version", path);
    d->B = h[2]; d->T = h[3]; d->S = h[4];
    d->P = (size_t)(uint32_t)h[5] | ((size_t)(uint32_t)h[6] << 32);
    d->Vp = h[7]; d->n = h[8]; d->K = h[9];
    if (d->P != expected_P) die("%s: %zu parameters, the model has %zu", path, d->P, expected_P);
    size_t BT = (size_t)d->B * d->T, nc = (size_t)d->K * BT * (2 * d->n + d->n * d->n);
    freadCheck(d->hyper, sizeof(double), 8, fp, path);
    d->inputs = (int *)mallocCheck(BT * sizeof(int));
    d->targets = (int *)mallocCheck(BT * sizeof(int));
    d->losses = (double *)mallocCheck(d->S * sizeof(double));
    d->logits = (float *)mallocCheck(BT * d->Vp * sizeof(float));
    d->grads = (float *)mallocCheck(d->P * sizeof(float));
    d->coeffs = (float *)mallocCheck(nc * sizeof(float));
    freadCheck(d->inputs, sizeof(int), BT, fp, path);
    freadCheck(d->targets, sizeof(int), BT, fp, path);
    freadCheck(d->losses, sizeof(double), d->S, fp, path);
    freadCheck(d->logits, sizeof(float), BT * d->Vp, fp, path);
    freadCheck(d->grads, sizeof(float), d->P, fp, path);
    freadCheck(d->coeffs, sizeof(float), nc, fp, path);
    char extra;
    if (fread(&extra, 1, 1, fp) != 0) die("%s: trailing bytes", path);
    fclose(fp);
}

static void free_debug(DebugState *d) {
    free(d->inputs); free(d->targets); free(d->losses); free(d->logits); free(d->grads); free(d->coeffs);
}

// one AdamW step on the debug batch as scripts/reference.py does it (constant lr); returns loss
static float train_step(GPTHC *m, const DebugState *d, int t) {
    gpt_forward(m, d->inputs, d->targets, d->B, d->T);
    gpt_zero_grad(m);
    gpt_backward(m, 1.0f, 1);
    float norm = gpt_grad_norm(m), clip = (float)d->hyper[5];
    float scale = norm > clip ? clip / norm : 1.0f;
    gpt_update(m, (float)d->hyper[0], (float)d->hyper[1], (float)d->hyper[2], (float)d->hyper[3], (float)d->hyper[4], scale, t);
    return m->mean_loss;
}

static double loss_at(GPTHC *m, const DebugState *d) {
    gpt_forward(m, d->inputs, d->targets, d->B, d->T);
    double s = 0.0;
    for (int i = 0; i < d->B * d->T; i++) s += m->acts.losses[i];
    return s / (d->B * d->T);
}

static void test_reference(const char *name) {
    char mpath[256], dpath[256];
    snprintf(mpath, sizeof mpath, "data/ref/%s_model.bin", name);
    snprintf(dpath, sizeof dpath, "data/ref/%s_debug.bin", name);
    GPTHC model;
    gpt_build_from_checkpoint(&model, mpath);
    DebugState d;
    read_debug(&d, dpath, model.num_parameters);
    GPTHCConfig *c = &model.config;
    int B = d.B, T = d.T, BT = B * T, n = c->n, K = 2 * c->num_layers;

    // forward: logits and loss
    gpt_forward(&model, d.inputs, d.targets, B, T);
    double ma, mr;
    diff_stats(model.acts.logits, d.logits, (size_t)BT * c->padded_vocab_size, &ma, &mr);
    report(ma / mr < 1e-5, "%-8s logits: max abs err %.2e, rel %.2e", name, ma, ma / mr);
    double lerr = fabs(model.mean_loss - d.losses[0]);
    report(lerr < 1e-5, "%-8s loss %.6f vs %.6f: err %.2e", name, model.mean_loss, d.losses[0], lerr);

    // coefficients of every sublayer (residual: all 1)
    if (c->mode != MODE_RESIDUAL) {
        double worst = 0.0;
        int w = 2 * n + n * n;
        for (int k = 0; k < K; k++)
            for (int bt = 0; bt < BT; bt++) {
                const float *ref = d.coeffs + ((size_t)k * BT + bt) * w;
                for (int i = 0; i < n; i++) {
                    worst = fmax(worst, fabs(model.acts.pre[((size_t)k * BT + bt) * n + i] - ref[i]));
                    worst = fmax(worst, fabs(model.acts.post[((size_t)k * BT + bt) * n + i] - ref[n + i]));
                }
                for (int q = 0; q < n * n; q++)
                    worst = fmax(worst, fabs(model.acts.res[((size_t)k * BT + bt) * n * n + q] - ref[2 * n + q]));
            }
        report(worst < 1e-5, "%-8s coefficients (pre, post, res) of %d sublayers: max abs err %.2e", name, K, worst);
    }

    // diagnostics on a fresh model of this config (the dump is 3 steps past init): mhc's Hres is
    // row-stochastic, so single and composite forward gains are 1; shc/dhc start at A_r = I and
    // dhc's dynamic part s_a tanh(N W_a) is 0 (W_a = 0): all gains 1
    {
        Diagnostics dg;
        diagnostics_alloc(&dg, c);
        double *gn = dg.fwd, worst = 0.0;
        GPTHC fresh;
        gpt_build_fresh(&fresh, c, 1337);
        gpt_forward(&fresh, d.inputs, d.targets, B, T);
        gpt_diagnostics(&fresh, BT, &dg);
        gpt_free(&fresh);
        int rows_only = c->mode == MODE_MHC;
        for (int k = 0; k < K; k++)
            for (int q = 0; q < 4; q++)
                if (!rows_only || q == 0 || q == 2) worst = fmax(worst, fabs(gn[q * K + k] - 1.0));
        report(worst < 1e-5, "%-8s gains at init: max |gain - 1| = %.2e (%s)", name, worst,
               rows_only ? "forward gains" : "all four");
        diagnostics_free(&dg);
    }

    // the unfolded connection matrix of single tokens: row k's weights on the embedding and the
    // sublayer outputs rebuild the sublayer input u_k, row K the summed final state
    {
        Diagnostics dg;
        diagnostics_alloc(&dg, c);
        int hc = c->mode != MODE_RESIDUAL, S = K + 1, C = c->channels;
        double worst = 0.0, top = 0.0;
        gpt_forward(&model, d.inputs, d.targets, B, T);
        int toks[3] = {0, 37 % BT, BT - 1};
        for (int ti = 0; ti < 3; ti++) {
            int bt = toks[ti];
            compute_diagnostics(&dg, hc ? model.acts.pre + (size_t)bt * n : NULL, hc ? model.acts.post + (size_t)bt * n : NULL,
                                hc ? model.acts.res + (size_t)bt * n * n : NULL, 1, BT);
            for (int k = 0; k <= K; k++) {
                const float *target = k == K ? model.acts.hsum + (size_t)bt * C
                                      : hc ? model.acts.u + ((size_t)k * BT + bt) * C : model.acts.H + ((size_t)k * BT + bt) * C;
                for (int ch = 0; ch < C; ch++) {
                    double v = dg.conn[k * S] * model.acts.x0[(size_t)bt * C + ch];
                    for (int m = 0; m < k; m++) v += dg.conn[k * S + 1 + m] * model.acts.y[((size_t)m * BT + bt) * C + ch];
                    worst = fmax(worst, fabs(v - target[ch]));
                    top = fmax(top, fabs(target[ch]));
                }
            }
        }
        report(worst < 1e-5 * top, "%-8s connection matrix rebuilds every sublayer input and h: max abs err %.2e (max |u| %.2e)",
               name, worst, top);
        diagnostics_free(&dg);
    }

    // backward: every parameter tensor
    gpt_zero_grad(&model);
    gpt_backward(&model, 1.0f, 1);
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAMETER_TENSORS; ti++) {
        size_t sz = model.param_sizes[ti];
        if (sz == 0) continue;
        diff_stats(model.grads_memory + off, d.grads + off, sz, &ma, &mr);
        double rel = mr > 0 ? ma / mr : ma;
        report(rel < 1e-4, "%-8s grad %-9s max abs err %.2e, max |ref| %.2e, rel %.2e", name, PARAM_NAMES[ti], ma, mr, rel);
        off += sz;
    }

    // 10 AdamW steps from the same checkpoint
    GPTHC m2;
    gpt_build_from_checkpoint(&m2, mpath);
    double worst = 0.0;
    for (int t = 1; t <= d.S; t++) {
        float l = train_step(&m2, &d, t);
        worst = fmax(worst, fabs(l - d.losses[t - 1]));
    }
    report(worst < 1e-4, "%-8s %d AdamW steps: losses %.5f -> %.5f, max err %.2e", name, d.S, d.losses[0], d.losses[d.S - 1], worst);

    // finite differences on the trained model, whose HC parameters have moved from their init:
    // the 3 entries of largest gradient in each HC/mHC tensor
    if (c->mode != MODE_RESIDUAL) {
        gpt_forward(&m2, d.inputs, d.targets, B, T);
        gpt_zero_grad(&m2);
        gpt_backward(&m2, 1.0f, 1);
        off = 0;
        for (int ti = 0; ti < NUM_PARAMETER_TENSORS; ti++) {
            size_t sz = m2.param_sizes[ti];
            if (ti >= P_HC_A && sz > 0) {
                double worst_rel = 0.0;
                int used[3] = {-1, -1, -1};
                for (int pick = 0; pick < 3 && pick < (int)sz; pick++) {
                    int best = -1;
                    for (size_t i = 0; i < sz; i++) {
                        if ((int)i == used[0] || (int)i == used[1]) continue;
                        if (best < 0 || fabsf(m2.grads_memory[off + i]) > fabsf(m2.grads_memory[off + best])) best = (int)i;
                    }
                    used[pick] = best;
                    float *p = m2.params_memory + off + best, saved = *p;
                    double an = m2.grads_memory[off + best];
                    float eps = 1e-2f * fmaxf(1.0f, fabsf(saved));
                    *p = saved + eps;
                    double lp = loss_at(&m2, &d);
                    *p = saved - eps;
                    double lm = loss_at(&m2, &d);
                    *p = saved;
                    double fd = (lp - lm) / (2.0 * ((double)(saved + eps) - (double)saved));
                    // fp32 loss noise (~1e-7) over 2 eps gives a floor of ~1e-5 in fd
                    double err = fabs(fd - an) / (2e-2 * fabs(an) + 2e-5);
                    if (err > worst_rel) worst_rel = err;
                }
                report(worst_rel < 1.0, "%-8s finite differences %-9s 3 largest-gradient entries: max |fd-an|/(2e-2|an|+2e-5) = %.2f",
                       name, PARAM_NAMES[ti], worst_rel);
                // the whole tensor along its gradient: d/de f(p + e g/|g|) = |g|, a large signal
                double gn = 0.0;
                for (size_t i = 0; i < sz; i++) gn += (double)m2.grads_memory[off + i] * m2.grads_memory[off + i];
                gn = sqrt(gn);
                float *saved = (float *)mallocCheck(sz * sizeof(float));
                memcpy(saved, m2.params_memory + off, sz * sizeof(float));
                // step so the loss moves by ~2e-4, well above fp32 noise (~1e-7); central differences
                // at e and e/2 combined (Richardson) cancel the e^2 curvature term
                double e = fmin(1.0, fmax(1e-2, 2e-4 / gn)), D[2];
                for (int h = 0; h < 2; h++) {
                    double eh = h ? e / 2 : e, lpm[2];
                    for (int sgn = 0; sgn < 2; sgn++) {
                        for (size_t i = 0; i < sz; i++)
                            m2.params_memory[off + i] = saved[i] + (sgn ? -1 : 1) * (float)(eh * m2.grads_memory[off + i] / gn);
                        lpm[sgn] = loss_at(&m2, &d);
                    }
                    D[h] = (lpm[0] - lpm[1]) / (2 * eh);
                }
                memcpy(m2.params_memory + off, saved, sz * sizeof(float));
                free(saved);
                double dd = (4 * D[1] - D[0]) / 3;
                report(fabs(dd - gn) / gn < 1e-2, "%-8s directional derivative %-9s along its gradient: fd %.6e vs |g| %.6e",
                       name, PARAM_NAMES[ti], dd, gn);
            }
            off += sz;
        }
    }
    gpt_free(&m2);

    // gradient accumulation: two half batches (loss_scale 0.5 each) = the whole batch
    if (B % 2 == 0) {
        float *full = (float *)mallocCheck(model.num_parameters * sizeof(float));
        memcpy(full, model.grads_memory, model.num_parameters * sizeof(float));
        gpt_zero_grad(&model);
        for (int half = 0; half < 2; half++) {
            gpt_forward(&model, d.inputs + half * BT / 2, d.targets + half * BT / 2, B / 2, T);
            gpt_backward(&model, 0.5f, half == 1);
        }
        diff_stats(model.grads_memory, full, model.num_parameters, &ma, &mr);
        report(ma / mr < 1e-5, "%-8s gradient accumulation over 2 micro-batches: rel err %.2e", name, ma / mr);
        free(full);
    }
    free_debug(&d);
    gpt_free(&model);
}

// Sinkhorn-Knopp backward against finite differences in float on random logits, n = 1..8
static void test_sinkhorn(void) {
    uint64_t rng = 7;
    double worst = 0.0, worst_rows = 0.0;
    for (int n = 1; n <= MAX_STREAMS; n++) {
        int iters = 20, nn = n * n;
        float X[64], dOut[64], dX[64], out[64];
        float *work = (float *)mallocCheck(((size_t)(2 * iters + 1) * nn + 2 * iters * n) * sizeof(float));
        for (int q = 0; q < nn; q++) { X[q] = 2.0f * rng_uniform(&rng) - 1.0f; dOut[q] = rng_uniform(&rng) - 0.5f; }
        sinkhorn_forward(out, X, n, iters, NULL, NULL);
        for (int i = 0; i < n; i++) {
            double s = 0.0;
            for (int j = 0; j < n; j++) s += out[i * n + j];
            worst_rows = fmax(worst_rows, fabs(s - 1.0));
        }
        sinkhorn_backward(dX, dOut, X, n, iters, work);
        for (int q = 0; q < nn; q++) {
            float saved = X[q], e = 1e-2f, op[64], om[64];
            X[q] = saved + e; sinkhorn_forward(op, X, n, iters, NULL, NULL);
            X[q] = saved - e; sinkhorn_forward(om, X, n, iters, NULL, NULL);
            X[q] = saved;
            double fd = 0.0;
            for (int r = 0; r < nn; r++) fd += (double)dOut[r] * ((double)op[r] - om[r]) / (2 * e);
            worst = fmax(worst, fabs(fd - dX[q]) / (fabs(dX[q]) + 1e-3));
        }
        free(work);
    }
    report(worst_rows < 1e-5, "sinkhorn rows sum to 1 for n = 1..8: max err %.2e", worst_rows);
    report(worst < 2e-2, "sinkhorn backward vs finite differences for n = 1..8: max rel err %.2e", worst);
}

// ----------------------------------------------------------------------------
// command-line tests (./train_gpt_hc must be built)

static int run_cmd(const char *cmd, char *err, size_t errlen) {
    char full[4096];
    snprintf(full, sizeof full, "%s 2>/tmp/gpt_hc_test_err >/tmp/gpt_hc_test_out", cmd);
    int st = system(full);
    FILE *fp = fopen("/tmp/gpt_hc_test_err", "r");
    err[0] = '\0';
    if (fp) { size_t r = fread(err, 1, errlen - 1, fp); err[r] = '\0'; fclose(fp); }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

// expect a non-zero exit and exactly one line on stderr starting "error:" and containing want
static void expect_error(const char *what, const char *cmd, const char *want) {
    char err[8192];
    int rc = run_cmd(cmd, err, sizeof err);
    int lines = 0;
    for (char *p = err; *p; p++) lines += *p == '\n';
    int ok = rc != 0 && strncmp(err, "error: ", 7) == 0 && lines == 1 && strstr(err, want) != NULL;
    report(ok, "bad input rejected: %s (exit %d: %.*s)", what, rc, (int)strcspn(err, "\n"), err);
}

static void write_shard(const char *path, int magic, int ntok, int declared, int bad_token) {
    int h[256] = {0};
    h[0] = magic; h[1] = 1; h[2] = declared;
    FILE *fp = fopenCheck(path, "wb");
    fwriteCheck(h, sizeof(int), 256, fp, path);
    for (int i = 0; i < ntok; i++) {
        uint16_t t = (uint16_t)(i == ntok / 2 && bad_token ? 60000 : (i * 7919) % 50257);
        fwriteCheck(&t, 2, 1, fp, path);
    }
    fclose(fp);
}

// the files are equal from byte `from` on (an optimizer state's 1024-byte header records the
// process count, so states of runs on different GPU counts are compared from 1024)
static int files_equal_from(const char *a, const char *b, long from) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int eq = fa && fb && fseek(fa, from, SEEK_SET) == 0 && fseek(fb, from, SEEK_SET) == 0;
    while (eq) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) eq = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}
static int files_equal(const char *a, const char *b) { return files_equal_from(a, b, 0); }

// copy src to dst with header word `index` set to value (to make corrupt files)
static void copy_with_int(const char *src, const char *dst, int index, int value) {
    FILE *fp = fopenCheck(src, "rb");
    long size = file_size_of(fp);
    char *buf = (char *)mallocCheck(size);
    freadCheck(buf, 1, size, fp, src);
    fclose(fp);
    memcpy(buf + 4 * index, &value, 4);
    fp = fopenCheck(dst, "wb");
    fwriteCheck(buf, 1, size, fp, dst);
    fclose(fp);
    free(buf);
}

static void test_cli(void) {
    // the trainer binary under test (make test-asan points this at the sanitized build)
    const char *trainer = getenv("GPT_HC_TRAINER") ? getenv("GPT_HC_TRAINER") : "./train_gpt_hc";
    if (access(trainer, X_OK) != 0) { report(0, "%s is not built", trainer); return; }
    char dir[] = "/tmp/gpt_hc_test_XXXXXX";
    if (mkdtemp(dir) == NULL) die("mkdtemp failed");
    char cmd[4096], a[4096], b[4096], err[8192];
    // a small shard pair for fast runs
    snprintf(a, sizeof a, "%s/ok_train_000000.bin", dir); write_shard(a, 20240520, 4000, 4000, 0);
    snprintf(a, sizeof a, "%s/ok_val_000000.bin", dir); write_shard(a, 20240520, 2000, 2000, 0);
    char base[512], base_t[512];
    snprintf(base, sizeof base, "%s -e d1 -b 2 -t 16 -v 0 -s 0", trainer);

    // resume: 6 steps straight vs 3 steps, then resume to 6 from the checkpoint; bit-exact
    const char *modes[] = {"residual", "mhc", "dhc"};
    for (int mi = 0; mi < 3; mi++) {
        snprintf(cmd, sizeof cmd, "%s -H %s -i '%s/ok_train_*' -j '%s/ok_val_*' -x 6 -n 3 -d 64 -l 1e-3 -o %s/run_a_%s",
                 base, modes[mi], dir, dir, dir, modes[mi]);
        int rc1 = run_cmd(cmd, err, sizeof err);
        snprintf(cmd, sizeof cmd, "mkdir -p %s/run_b_%s && cp %s/run_a_%s/*_00000003* %s/run_b_%s/", dir, modes[mi], dir, modes[mi], dir, modes[mi]);
        int rc2 = system(cmd);
        snprintf(cmd, sizeof cmd, "%s -H %s -i '%s/ok_train_*' -j '%s/ok_val_*' -x 6 -n 3 -d 64 -l 1e-3 -o %s/run_b_%s -y 1",
                 base, modes[mi], dir, dir, dir, modes[mi]);
        int rc3 = run_cmd(cmd, err, sizeof err);
        snprintf(a, sizeof a, "%s/run_a_%s/model_00000006.bin", dir, modes[mi]);
        snprintf(b, sizeof b, "%s/run_b_%s/model_00000006.bin", dir, modes[mi]);
        int same_model = files_equal(a, b);
        snprintf(a, sizeof a, "%s/run_a_%s/state_00000006.bin", dir, modes[mi]);
        snprintf(b, sizeof b, "%s/run_b_%s/state_00000006.bin", dir, modes[mi]);
        int same_state = files_equal(a, b);
        report(rc1 == 0 && rc2 == 0 && rc3 == 0 && same_model && same_state,
               "resume %s (2 micro-batches per step): 3+3 steps give the same step-6 model and optimizer state, bit for bit", modes[mi]);
    }
    // the checkpoint resumes with -e too (a checkpoint as init)
    snprintf(base_t, sizeof base_t, "%s -b 2 -t 16 -v 1 -s 0", trainer);
    snprintf(cmd, sizeof cmd, "%s -e %s/run_a_mhc/model_00000006.bin -i '%s/ok_train_*' -j '%s/ok_val_*' -x 0 -g 8",
             base_t, dir, dir, dir);
    report(run_cmd(cmd, err, sizeof err) == 0, "a checkpoint loads as -e init and samples (-x 0)");

    // bad input: one-line error, non-zero exit
    snprintf(b, sizeof b, "-i '%s/ok_train_*' -j '%s/ok_val_*' -x 1", dir, dir);
    // {what, flags after the base command and data, the error must contain}
    const char *bad_flags[][3] = {
        {"unknown mode", "-H nope", "unknown mode"}, {"n out of range", "-E 9 -H mhc", "out of range"},
        {"n > 1 with residual", "-E 4", "residual mode"}, {"batch size 0", "-b 0", "out of range"},
        {"non-numeric lr", "-l abc", "wants a number"}, {"unknown flag", "-Q 1", "unknown flag"},
        {"missing value", "-x", "needs a value"}, {"total batch not a multiple", "-d 100", "not a multiple"},
        {"T > max_seq_len", "-b 1 -t 2048", "max_seq_len"}, {"depth out of range", "-e d99", "out of range 1..72"},
        {"-pz out of range", "-pz 2", "out of range"}, {"-r 0", "-H mhc -r 0", "out of range"},
        {"-r not a number", "-H mhc -r often", "wants an integer"},
        // several processes: the CPU trainer is one; the CUDA trainer checks the launch flags
        {"-pn 2 on the CPU trainer", "-pn 2", "needs the CUDA trainer"},
        {"-pr without -pi", "-pn 2 -pr 1", "give -pi"},
        {"unknown -pi", "-pn 2 -pr 1 -pi nfs:/x", "expected mpi, fs:DIR or tcp:HOST:PORT"},
        {"-pr >= -pn", "-pn 2 -pr 2 -pi fs:/tmp", "out of range"},
        {"tcp without port", "-pn 2 -pr 1 -pi tcp:nohost", "expected tcp:HOST:PORT"},
        {"-pi without -pr", "-pn 2 -pi fs:/tmp", "needs -pr"},
        {"-d not a multiple of B*T*processes", "-pn 2 -d 96", "B*T*processes"}};
    int cuda = strstr(trainer, "hcu") != NULL;
    for (size_t i = 0; i < sizeof bad_flags / sizeof bad_flags[0]; i++) {
        int multi = strncmp(bad_flags[i][1], "-pn", 3) == 0, cpu_only = strstr(bad_flags[i][0], "CPU") != NULL;
        if (multi && (cpu_only ? cuda : !cuda)) continue;   // -p flags: CPU or CUDA cases
        snprintf(cmd, sizeof cmd, "%s %s %s", base, b, bad_flags[i][1]);
        expect_error(bad_flags[i][0], cmd, bad_flags[i][2]);
    }
    snprintf(cmd, sizeof cmd, "%s -i '%s/none_*' -j '%s/ok_val_*'", base, dir, dir); expect_error("no shards", cmd, "no data shards");
    snprintf(cmd, sizeof cmd, "%s %s -y 1", base, b); expect_error("resume without -o", cmd, "needs -o");
    snprintf(a, sizeof a, "%s/magic_train_000000.bin", dir); write_shard(a, 12345, 4000, 4000, 0);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s/ok_val_*' -x 1", base, a, dir); expect_error("shard bad magic", cmd, "bad magic");
    snprintf(a, sizeof a, "%s/trunc_train_000000.bin", dir); write_shard(a, 20240520, 3000, 4000, 0);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s/ok_val_*' -x 1", base, a, dir); expect_error("shard truncated", cmd, "truncated");
    snprintf(a, sizeof a, "%s/tok_train_000000.bin", dir); write_shard(a, 20240520, 4000, 4000, 1);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s/ok_val_*' -x 1", base, a, dir); expect_error("token id >= V", cmd, ">= the model's vocab size");
    snprintf(a, sizeof a, "%s/small_train_000000.bin", dir); write_shard(a, 20240520, 20, 20, 0);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s/ok_val_*' -x 1", base, a, dir); expect_error("shard smaller than a batch", cmd, "fewer than one batch");
    // checkpoints: n mismatch, mode mismatch, truncated, not a checkpoint
    snprintf(a, sizeof a, "%s/run_a_mhc/model_00000006.bin", dir);
    snprintf(cmd, sizeof cmd, "%s %s -e %s -E 2", base, b, a); expect_error("n differs from checkpoint", cmd, "n = 4 streams");
    snprintf(cmd, sizeof cmd, "%s %s -e %s -H dhc", base, b, a); expect_error("mode differs from checkpoint", cmd, "holds a mhc model");
    snprintf(cmd, sizeof cmd, "head -c 5000 %s > %s/trunc_model.bin", a, dir);
    if (system(cmd) != 0) report(0, "head failed");
    snprintf(cmd, sizeof cmd, "%s %s -e %s/trunc_model.bin", base, b, dir); expect_error("truncated checkpoint", cmd, "truncated");
    snprintf(cmd, sizeof cmd, "%s %s -e %s/ok_val_000000.bin", base, b, dir); expect_error("shard given as checkpoint", cmd, "bad magic");
    snprintf(cmd, sizeof cmd, "%s %s -e %s/nonexistent.bin", base, b, dir); expect_error("missing checkpoint", cmd, "cannot open");
    char bad[4096];
    snprintf(bad, sizeof bad, "%s/bad_version.bin", dir); copy_with_int(a, bad, 1, 9);
    snprintf(cmd, sizeof cmd, "%s %s -e %s", base, b, bad); expect_error("checkpoint version", cmd, "unsupported checkpoint version");
    snprintf(bad, sizeof bad, "%s/bad_heads.bin", dir); copy_with_int(a, bad, 5, 3);
    snprintf(cmd, sizeof cmd, "%s %s -e %s", base, b, bad); expect_error("impossible config (C % NH)", cmd, "impossible config");
    snprintf(bad, sizeof bad, "%s/bad_mode.bin", dir); copy_with_int(a, bad, 8, 7);
    snprintf(cmd, sizeof cmd, "%s %s -e %s", base, b, bad); expect_error("unknown mode id", cmd, "unknown residual mode");
    snprintf(bad, sizeof bad, "%s/bad_count.bin", dir); copy_with_int(a, bad, 12, 12345);
    snprintf(cmd, sizeof cmd, "%s %s -e %s", base, b, bad); expect_error("parameter count", cmd, "parameters, the config implies");
    // a resume whose optimizer state is corrupt
    snprintf(cmd, sizeof cmd, "mkdir -p %s/run_c && cp %s/run_a_mhc/*_00000003* %s/run_c/", dir, dir, dir);
    if (system(cmd) != 0) report(0, "cp failed");
    snprintf(a, sizeof a, "%s/run_a_mhc/state_00000003.bin", dir);
    snprintf(bad, sizeof bad, "%s/run_c/state_00000003.bin", dir); copy_with_int(a, bad, 0, 42);
    snprintf(cmd, sizeof cmd, "%s -H mhc -i '%s/ok_train_*' -j '%s/ok_val_*' -x 6 -o %s/run_c -y 1", base, dir, dir, dir);
    expect_error("optimizer state with bad magic", cmd, "not a gpt_hc optimizer state");
    snprintf(cmd, sizeof cmd, "head -c 3000 %s > %s", a, bad);
    if (system(cmd) != 0) report(0, "head failed");
    snprintf(cmd, sizeof cmd, "%s -H mhc -i '%s/ok_train_*' -j '%s/ok_val_*' -x 6 -o %s/run_c -y 1", base, dir, dir, dir);
    expect_error("truncated optimizer state", cmd, "truncated");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) report(0, "cleanup failed");
}

// ----------------------------------------------------------------------------
// data parallel runs of the CUDA trainer on 2 GPUs (--multi-gpu; GPT_HC_TRAINER picks the build)

// the losses of a run's main.log ("s:N trl:X"), in step order; returns how many
static int read_losses(const char *dir, double *out, int max) {
    char path[4096], line[512];
    snprintf(path, sizeof path, "%s/main.log", dir);
    FILE *fp = fopen(path, "r");
    int n = 0, s;
    double x;
    if (!fp) return 0;
    while (fgets(line, sizeof line, fp) && n < max)
        if (sscanf(line, "s:%d trl:%lf", &s, &x) == 2) out[n++] = x;
    fclose(fp);
    return n;
}

// a checkpoint's parameters (caller frees), or NULL
static float *read_params(const char *path, GPTHCConfig *c, size_t *P) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    *P = read_model_header(fp, path, c);
    float *p = (float *)mallocCheck(*P * sizeof(float));
    freadCheck(p, sizeof(float), *P, fp, path);
    fclose(fp);
    return p;
}

// max relative difference of two checkpoints, per tensor (relative to the tensor's largest
// value); prints the tensors that differ. Returns the worst, or 1e30 if one is missing.
static double compare_checkpoints(const char *a, const char *b, int verbose) {
    GPTHCConfig ca, cb;
    size_t Pa = 0, Pb = 0, sizes[NUM_PARAMETER_TENSORS];
    float *pa = read_params(a, &ca, &Pa), *pb = read_params(b, &cb, &Pb);
    double worst = (pa && pb && Pa == Pb) ? 0.0 : 1e30;
    if (worst == 0.0) {
        fill_param_sizes(sizes, &ca);
        size_t off = 0;
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            if (sizes[i] > 0) {
                double m, r;
                diff_stats(pa + off, pb + off, sizes[i], &m, &r);
                double rel = m / (r > 0 ? r : 1.0);
                if (!(rel <= worst)) worst = rel;
                if (verbose && rel > 0) printf("    %-9s max abs diff %.3e (rel %.3e)\n", PARAM_NAMES[i], m, rel);
            }
            off += sizes[i];
        }
    }
    free(pa);
    free(pb);
    return worst;
}

// run DIR/MD_NAME's step-20 checkpoint against the 1-GPU run's (DIR/MD_one): *dp the weights' max
// relative difference; true if the model files and the AdamW moments are identical
static int same_as_one(const char *dir, const char *md, const char *name, double *dp) {
    char a[4096], b[4096], sa[4096], sb[4096];
    snprintf(a, sizeof a, "%s/%s_one/model_00000020.bin", dir, md);
    snprintf(b, sizeof b, "%s/%s_%s/model_00000020.bin", dir, md, name);
    snprintf(sa, sizeof sa, "%s/%s_one/state_00000020.bin", dir, md);
    snprintf(sb, sizeof sb, "%s/%s_%s/state_00000020.bin", dir, md, name);
    *dp = compare_checkpoints(a, b, 1);
    return *dp == 0.0 && files_equal(a, b) && files_equal_from(sa, sb, 1024);
}

static void test_multi_gpu(void) {
    const char *trainer = getenv("GPT_HC_TRAINER") ? getenv("GPT_HC_TRAINER") : "./train_gpt_hcu_fp32";
    // GPU runs must equal each other bit for bit in both precisions (every sum has a fixed order);
    // the CPU trainer continuing a GPU checkpoint agrees to this bound on the losses (fp32: 1e-4;
    // a BF16 run's checkpoint: bf16 rounding, make test-multigpu passes 1e-2)
    double cpu_tol = getenv("GPT_HC_CPU_TOL") ? atof(getenv("GPT_HC_CPU_TOL")) : 1e-4;
    if (access(trainer, X_OK) != 0) { report(0, "%s is not built", trainer); return; }
    char dir[] = "/tmp/gpt_hc_multi_XXXXXX";
    if (mkdtemp(dir) == NULL) die("mkdtemp failed");
    char cmd[4096], a[4096], b[4096], err[8192], data[1024];
    if (access("data/tiny/tiny_train_000000.bin", R_OK) == 0) {
        snprintf(data, sizeof data, "-i 'data/tiny/tiny_train_*.bin' -j 'data/tiny/tiny_val_*.bin'");
    } else {
        snprintf(a, sizeof a, "%s/x_train_000000.bin", dir); write_shard(a, 20240520, 40000, 40000, 0);
        snprintf(a, sizeof a, "%s/x_val_000000.bin", dir); write_shard(a, 20240520, 8000, 8000, 0);
        snprintf(data, sizeof data, "-i '%s/x_train_*' -j '%s/x_val_*'", dir, dir);
    }
    // every mode (n = 4); GPT_HC_MULTI_MODES="shc dhc" picks some
    const char *modes[] = {"residual", "shc", "dhc", "mhc"}, *pick = getenv("GPT_HC_MULTI_MODES");
    for (int mi = 0; mi < 4; mi++) {
        const char *md = modes[mi];
        if (pick && *pick && strstr(pick, md) == NULL) continue;
        char args[2048], base[2048];
        // total batch 2 x B*T: one GPU accumulates 2 micro-batches, two GPUs take one each
        snprintf(args, sizeof args, "-e d2 -H %s -b 4 -t 64 -d 512 -x 20 -l 1e-3 -u 2 -q 0.1 -v 10 -m 4 -s 0 -n 10 %s", md, data);
        snprintf(base, sizeof base, "%s %s", trainer, args);
        // 1 GPU; 2 GPUs started by the trainer (-pn 2) without and with ZeRO-1; 2 GPUs started
        // one process each, meeting through a shared directory and through TCP
        char fs[2048], tcp[2048];
        snprintf(fs, sizeof fs, "-pn 2 -pi fs:%s", dir);
        snprintf(tcp, sizeof tcp, "-pn 2 -pi tcp:127.0.0.1:%d", 29500 + (int)(getpid() % 1000) + mi);
        // and, with GPT_HC_MPI_TRAINER (a USE_MPI build of the same precision), under mpirun
        const char *mpi = getenv("GPT_HC_MPI_TRAINER");
        if (mpi && !*mpi) mpi = NULL;
        // and with the gradient sums overlapping the backward (GPT_HC_OVERLAP=1; on one machine
        // the default is off), with and without ZeRO-1
        const char *runs[8][2] = {{"one", ""}, {"two", "-pn 2 -pz 0"}, {"zero", "-pn 2 -pz 1"}, {"fs", fs}, {"tcp", tcp},
                                  {"overlap", "-pn 2 -pz 0"}, {"overlap_zero", "-pn 2 -pz 1"}, {"mpi", "mpirun -np 2"}};
        int nruns = mpi ? 8 : 7, ok = 1;
        for (int r = 0; r < nruns; r++) {
            if (r == 7) {
                snprintf(cmd, sizeof cmd, "mpirun --allow-run-as-root --oversubscribe -np 2 -x NCCL_NVLS_ENABLE %s %s -o %s/%s_mpi", mpi, args, dir, md);
            } else if (r < 3 || r == 5 || r == 6) {
                snprintf(cmd, sizeof cmd, "%s%s %s -o %s/%s_%s", r >= 5 ? "GPT_HC_OVERLAP=1 " : "", base, runs[r][1], dir, md, runs[r][0]);
            } else {   // rank 1 in the background, rank 0 here; both must succeed
                snprintf(cmd, sizeof cmd, "( %s %s -pr 1 -o %s/%s_%s & p=$!; %s %s -pr 0 -o %s/%s_%s; r=$?; wait $p; exit $(( $? | r )) )",
                         base, runs[r][1], dir, md, runs[r][0], base, runs[r][1], dir, md, runs[r][0]);
            }
            if (run_cmd(cmd, err, sizeof err) != 0) { ok = 0; printf("    %s: %.*s\n", runs[r][0], (int)strcspn(err, "\n"), err); }
        }
        report(ok, "%s: 20 steps run on 1 GPU; on 2 GPUs started with -pn 2 (ZeRO-1 off, on; overlapped sums too) and one process each (-pi fs:, tcp:%s)", md,
               mpi ? ", mpirun" : "");
        double la[32], lb[32];
        snprintf(a, sizeof a, "%s/%s_one", dir, md);
        int na = read_losses(a, la, 32);
        for (int r = 1; r < nruns; r++) {
            snprintf(b, sizeof b, "%s/%s_%s", dir, md, runs[r][0]);
            int nb = read_losses(b, lb, 32);
            double dl = na == 20 && nb == 20 ? 0.0 : 1e30;
            for (int i = 0; i < na && i < nb; i++) dl = fmax(dl, fabs(la[i] - lb[i]));
            double dp;
            int same = same_as_one(dir, md, runs[r][0], &dp);
            report(dl == 0.0 && same, "%s: 2 GPUs (%s%s) = 1 GPU, same total batch, 20 steps: losses max diff %.2e, weights max rel diff %.2e, model and AdamW state %s",
                   md, r == 5 || r == 6 ? "GPT_HC_OVERLAP=1 " : "", runs[r][1], dl, dp, same ? "identical" : "differ");
        }
        // checkpoints across GPU counts: step 10 of a 2-GPU ZeRO run resumed on 1 GPU, and step
        // 10 of the 1-GPU run resumed on 2 GPUs, continue to the same step 20
        const char *moves[2][3] = {{"zero", "to1", ""}, {"one", "to2", "-pn 2"}};
        for (int r = 0; r < 2; r++) {
            snprintf(cmd, sizeof cmd, "mkdir -p %s/%s_%s && cp %s/%s_%s/*_00000010* %s/%s_%s/", dir, md, moves[r][1], dir, md,
                     moves[r][0], dir, md, moves[r][1]);
            int rc = system(cmd);
            snprintf(cmd, sizeof cmd, "%s %s -o %s/%s_%s -y 1", base, moves[r][2], dir, md, moves[r][1]);
            rc |= run_cmd(cmd, err, sizeof err);
            double dp;
            int same = same_as_one(dir, md, moves[r][1], &dp);
            report(rc == 0 && same, "%s: a step-10 checkpoint of the %s run resumed on %s GPU(s) reaches the 1-GPU run's step 20: weights max rel diff %.2e, model and AdamW state %s%s",
                   md, moves[r][0], r == 0 ? "1" : "2", dp, same ? "identical" : "differ", rc ? " (run failed)" : "");
        }
        // the CPU trainer resumes a 2-GPU checkpoint (fp32 CPU vs GPU: rounding-level agreement)
        if (access("./train_gpt_hc", X_OK) == 0) {
            snprintf(cmd, sizeof cmd, "mkdir -p %s/%s_cpu && cp %s/%s_zero/*_00000010* %s/%s_cpu/", dir, md, dir, md, dir, md);
            int rc = system(cmd);
            char cbase[2048];
            snprintf(cbase, sizeof cbase, "OMP_NUM_THREADS=8 ./train_gpt_hc -e d2 -H %s -b 4 -t 64 -d 512 -x 20 -l 1e-3 -u 2 -q 0.1 -v 10 -m 4 -s 0 -n 10 %s -o %s/%s_cpu -y 1",
                     md, data, dir, md);
            rc |= run_cmd(cbase, err, sizeof err);
            snprintf(b, sizeof b, "%s/%s_cpu", dir, md);
            int nb = read_losses(b, lb, 32);
            double dl = nb == 10 && na == 20 ? 0.0 : 1e30;
            for (int i = 0; i < nb && i + 10 < na; i++) dl = fmax(dl, fabs(la[i + 10] - lb[i]));
            report(rc == 0 && dl < cpu_tol,
                   "%s: the CPU trainer resumes the 2-GPU step-10 checkpoint: steps 11-20 losses within %.2e of the 1-GPU run (bound %.0e)", md, dl, cpu_tol);
        }
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) report(0, "cleanup failed");
}

int main(int argc, char **argv) {
    const char *names[] = {"residual", "shc4", "dhc4", "mhc4", "mhc2"};
    int only_ref = argc > 1 && strcmp(argv[1], "--ref-only") == 0;
    int only_cli = argc > 1 && strcmp(argv[1], "--cli-only") == 0;   // e.g. for the CUDA trainer
    if (argc > 1 && strcmp(argv[1], "--multi-gpu") == 0) {
        test_multi_gpu();
        return tests_summary();
    }
    if (!only_cli) {
        test_sinkhorn();
        for (int i = 0; i < 5; i++) test_reference(names[i]);
    }
    if (!only_ref) test_cli();
    return tests_summary();
}
