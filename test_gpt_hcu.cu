/*
Tests of the CUDA trainer on a GPU (make test-cuda builds and runs them in FP32 and BF16):
 1. against the PyTorch float64 dumps (data/ref): logits, loss, HC coefficients, every
    parameter gradient, 10 AdamW steps. FP32 tolerances as the CPU test (1e-4 relative to each
    tensor's largest value); BF16: 5e-2 relative for logits and gradients (bf16 keeps 8 bits:
    2^-8 = 4e-3 per rounding, compounded over a dozen roundings per value), 2e-2 for losses;
 2. CPU vs CUDA on a larger random config through the shared command line: the step losses of
    ./train_gpt_hc and this build agree (FP32: 1e-3 relative; BF16: 2e-2).
Prints 'N passed, N failed' last.
*/
#define TESTING
#include "train_gpt_hc.cu"
#include "llmc/test_report.h"
#include <sys/wait.h>

#if defined(ENABLE_FP32)
#define TOL_REL 1e-4
#define TOL_LOSS 1e-4
#define TOL_COEF 1e-5
#define TOL_CPU 1e-3
#define TRAINER "./train_gpt_hcu_fp32"
#else
#define TOL_REL 5e-2
#define TOL_LOSS 2e-2
#define TOL_COEF 2e-2
#define TOL_CPU 2e-2
#define TRAINER "./train_gpt_hcu"
#endif




static float *to_host_f(const float *d, size_t n) {
    float *out = (float *)mallocCheck(n * sizeof(float));
    cudaCheck(cudaMemcpy(out, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
}

static void test_reference(const char *name) {
    char mpath[256], dpath[256];
    snprintf(mpath, sizeof mpath, "data/ref/%s_model.bin", name);
    snprintf(dpath, sizeof dpath, "data/ref/%s_debug.bin", name);
    GPTHC model;
    gpt_build_from_checkpoint(&model, mpath);
    GPTHCConfig *c = &model.config;
    FILE *fp = fopenCheck(dpath, "rb");
    int h[256];
    freadCheck(h, sizeof(int), 256, fp, dpath);
    int B = h[2], T = h[3], S = h[4], n = c->n, K = 2 * c->num_layers, BT = B * T, Vp = c->padded_vocab_size;
    double hyper[8];
    freadCheck(hyper, sizeof(double), 8, fp, dpath);
    int *inputs = (int *)mallocCheck(BT * sizeof(int)), *targets = (int *)mallocCheck(BT * sizeof(int));
    double *losses = (double *)mallocCheck(S * sizeof(double));
    float *logits = (float *)mallocCheck((size_t)BT * Vp * sizeof(float)), *grads = (float *)mallocCheck(model.num_parameters * sizeof(float));
    size_t w = 2 * n + n * n, nc = (size_t)K * BT * w;
    float *coeffs = (float *)mallocCheck(nc * sizeof(float));
    freadCheck(inputs, sizeof(int), BT, fp, dpath);
    freadCheck(targets, sizeof(int), BT, fp, dpath);
    freadCheck(losses, sizeof(double), S, fp, dpath);
    freadCheck(logits, sizeof(float), (size_t)BT * Vp, fp, dpath);
    freadCheck(grads, sizeof(float), model.num_parameters, fp, dpath);
    freadCheck(coeffs, sizeof(float), nc, fp, dpath);
    fclose(fp);

    gpt_forward(&model, inputs, targets, B, T);
    double ma, mr;
    float *lg = floatx_to_host(model.acts.logits, (size_t)BT * Vp);
    diff_stats(lg, logits, (size_t)BT * Vp, &ma, &mr);
    report(ma / mr < TOL_REL, "%-8s logits: max abs err %.2e, rel %.2e", name, ma, ma / mr);
    free(lg);
    report(fabs(model.mean_loss - losses[0]) < TOL_LOSS, "%-8s loss %.6f vs %.6f", name, model.mean_loss, losses[0]);
    if (c->mode != MODE_RESIDUAL) {
        float *pre = to_host_f(model.acts.pre, (size_t)K * BT * n), *post = to_host_f(model.acts.post, (size_t)K * BT * n);
        float *res = to_host_f(model.acts.res, (size_t)K * BT * n * n);
        double worst = 0.0;
        for (size_t kb = 0; kb < (size_t)K * BT; kb++) {
            const float *ref = coeffs + kb * w;
            for (int i = 0; i < n; i++) {
                worst = fmax(worst, fabs(pre[kb * n + i] - ref[i]));
                worst = fmax(worst, fabs(post[kb * n + i] - ref[n + i]));
            }
            for (int q = 0; q < n * n; q++) worst = fmax(worst, fabs(res[kb * n * n + q] - ref[2 * n + q]));
        }
        report(worst < TOL_COEF, "%-8s coefficients of %d sublayers: max abs err %.2e", name, K, worst);
        free(pre); free(post); free(res);
    }
    gpt_zero_grad(&model);
    gpt_backward(&model, 1.0f);
    float *g = to_host_f(model.grads_memory, model.num_parameters);
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAMETER_TENSORS; ti++) {
        size_t sz = model.param_sizes[ti];
        if (sz == 0) continue;
        diff_stats(g + off, grads + off, sz, &ma, &mr);
        double rel = mr > 0 ? ma / mr : ma;
        report(rel < TOL_REL, "%-8s grad %-9s max abs err %.2e, rel %.2e", name, PARAM_NAMES[ti], ma, rel);
        off += sz;
    }
    free(g);
    GPTHC m2;
    gpt_build_from_checkpoint(&m2, mpath);
    double worst = 0.0;
    for (int t = 1; t <= S; t++) {
        gpt_forward(&m2, inputs, targets, B, T);
        gpt_zero_grad(&m2);
        gpt_backward(&m2, 1.0f);
        float norm = gpt_grad_norm(&m2), clip = (float)hyper[5];
        gpt_update(&m2, (float)hyper[0], (float)hyper[1], (float)hyper[2], (float)hyper[3], (float)hyper[4], norm > clip ? clip / norm : 1.0f, t);
        worst = fmax(worst, fabs(m2.mean_loss - losses[t - 1]));
    }
    report(worst < TOL_LOSS, "%-8s %d AdamW steps: max loss err %.2e", name, S, worst);
    gpt_free(&m2);
    gpt_free(&model);
    free(inputs); free(targets); free(losses); free(logits); free(grads); free(coeffs);
}

// CPU vs CUDA through the command line: same fresh model, same data, compare step losses
static int read_losses(const char *log, double *out, int max) {
    FILE *fp = fopen(log, "r");
    if (!fp) return 0;
    char line[512];
    int cnt = 0, s;
    double l;
    while (fgets(line, sizeof line, fp) && cnt < max)
        if (sscanf(line, "s:%d trl:%lf", &s, &l) == 2) out[cnt++] = l;
    fclose(fp);
    return cnt;
}

static void test_cpu_vs_cuda(void) {
    if (access("./train_gpt_hc", X_OK) != 0 || access(TRAINER, X_OK) != 0) { report(0, "trainers not built"); return; }
    char dir[] = "/tmp/gpt_hcu_test_XXXXXX";
    if (mkdtemp(dir) == NULL) die("mkdtemp failed");
    char path[512], cmd[2048];
    for (int split = 0; split < 2; split++) {   // synthetic shards: a repeating pseudo-random text
        snprintf(path, sizeof path, "%s/syn_%s_000000.bin", dir, split ? "val" : "train");
        int N = 20000, hd[256] = {0};
        hd[0] = 20240520; hd[1] = 1; hd[2] = N;
        FILE *fp = fopenCheck(path, "wb");
        fwriteCheck(hd, sizeof(int), 256, fp, path);
        uint64_t rng = 99 + split;
        for (int i = 0; i < N; i++) { uint16_t t = (uint16_t)((i % 97) < 60 ? (i * 31) % 500 : rng_next(&rng) % 50257); fwriteCheck(&t, 2, 1, fp, path); }
        fclose(fp);
    }
    const char *modes[] = {"residual", "shc", "dhc", "mhc"};
    for (int mi = 0; mi < 4; mi++) {
        double a[8], b[8];
        const char *common = "-e d4 -b 2 -t 256 -x 4 -l 1e-3 -v 0 -s 0";
        snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=16 ./train_gpt_hc %s -H %s -i '%s/syn_train_*' -j '%s/syn_val_*' -o %s/cpu_%s > /dev/null",
                 common, modes[mi], dir, dir, dir, modes[mi]);
        int r1 = system(cmd);
        snprintf(cmd, sizeof cmd, "%s %s -H %s -i '%s/syn_train_*' -j '%s/syn_val_*' -o %s/gpu_%s > /dev/null",
                 TRAINER, common, modes[mi], dir, dir, dir, modes[mi]);
        int r2 = system(cmd);
        snprintf(path, sizeof path, "%s/cpu_%s/main.log", dir, modes[mi]);
        int na = read_losses(path, a, 8);
        snprintf(path, sizeof path, "%s/gpu_%s/main.log", dir, modes[mi]);
        int nb = read_losses(path, b, 8);
        double worst = na == 4 && nb == 4 ? 0.0 : 1e9;
        for (int i = 0; i < na && i < nb; i++) worst = fmax(worst, fabs(a[i] - b[i]) / fabs(a[i]));
        report(r1 == 0 && r2 == 0 && worst < TOL_CPU, "CPU vs CUDA, d4 C=256 T=256 %s: 4 step losses, max rel diff %.2e (cpu %.5f gpu %.5f at step 4)",
               modes[mi], worst, na == 4 ? a[3] : 0.0, nb == 4 ? b[3] : 0.0);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) report(0, "cleanup failed");
}

int main(int argc, char **argv) {
    g_test_tag = "[" PRECISION_NAME "] ";
    const char *names[] = {"residual", "shc4", "dhc4", "mhc4", "mhc2"};
    for (int i = 0; i < 5; i++) test_reference(names[i]);
    if (!(argc > 1 && strcmp(argv[1], "--ref-only") == 0)) test_cpu_vs_cuda();
    return tests_summary();
}
