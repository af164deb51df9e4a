/*
What the two test programs (test_gpt_hc.c, test_gpt_hcu.cu) share: PASS/FAIL lines with a count
that ends in 'N passed, N failed', and the error statistics every comparison reports.
*/
#ifndef GPT_HC_TEST_REPORT_H
#define GPT_HC_TEST_REPORT_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

static int g_pass = 0, g_fail = 0;
static const char *g_test_tag = "";   // e.g. "[bf16] " in the CUDA test

static void report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s %s", ok ? "PASS" : "FAIL", g_test_tag);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) g_pass++; else g_fail++;
    fflush(stdout);
}

// max |a - b| and max |b|; a NaN in a makes maxabs NaN, which fails every tolerance
static void diff_stats(const float *a, const float *b, size_t n, double *maxabs, double *maxref) {
    double m = 0.0, r = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = d;
        if (fabs(b[i]) > r) r = fabs(b[i]);
    }
    *maxabs = m;
    *maxref = r;
}

static int tests_summary(void) {
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}

#endif
