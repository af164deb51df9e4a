/*
Deterministic random numbers shared by the trainers: splitmix64 for the stream, Box-Muller for
normals. Same seed, same weights, in the C and the CUDA trainer (init runs on the host).
*/
#ifndef GPT_HC_RAND_H
#define GPT_HC_RAND_H

#include <math.h>
#include <stdint.h>

static inline uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// uniform in [0, 1) with 24 random bits (exactly representable as float)
static inline float rng_uniform(uint64_t *s) { return (float)(rng_next(s) >> 40) / 16777216.0f; }

static inline void rng_normal_fill(uint64_t *s, float *out, size_t n, float mean, float std) {
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;   // (0, 1)
        double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        out[i] = (float)(mean + std * r * cos(2.0 * M_PI * u2));
        if (i + 1 < n) out[i + 1] = (float)(mean + std * r * sin(2.0 * M_PI * u2));
    }
}

#endif
