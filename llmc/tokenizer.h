/*
Decoding side of the GPT-2 tokenizer: reads llm.c's gpt2_tokenizer.bin (docs/FORMATS.md).
Used to print samples. Without the file, samples are printed as token ids.
*/
#ifndef GPT_HC_TOKENIZER_H
#define GPT_HC_TOKENIZER_H

#include <stdint.h>
#include "utils.h"

typedef struct {
    uint32_t vocab_size;
    char **token_table;
    int init_ok;
    int eot_token;
} Tokenizer;

static void tokenizer_init(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof(*t));
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "warning: no tokenizer file %s (run 'make data'); samples print token ids\n", path);
        return;
    }
    int h[256];
    freadCheck(h, sizeof(int), 256, fp, path);
    if (h[0] != 20240328) die("%s: bad magic %d (not an llm.c tokenizer file)", path, h[0]);
    if (h[1] != 1 && h[1] != 2) die("%s: unsupported tokenizer version %d", path, h[1]);
    if (h[2] <= 0 || h[2] > (1 << 24)) die("%s: bad vocab size %d", path, h[2]);
    t->vocab_size = (uint32_t)h[2];
    t->eot_token = h[1] == 2 ? h[3] : 50256;
    t->token_table = (char **)mallocCheck(t->vocab_size * sizeof(char *));
    for (uint32_t i = 0; i < t->vocab_size; i++) {
        unsigned char len;
        freadCheck(&len, 1, 1, fp, path);
        if (len == 0) die("%s: token %u has length 0", path, i);
        t->token_table[i] = (char *)mallocCheck(len + 1);
        freadCheck(t->token_table[i], 1, len, fp, path);
        t->token_table[i][len] = '\0';
    }
    fclose(fp);
    t->init_ok = 1;
}

// print a token's text, or its id if there is no tokenizer; unprintable single bytes are skipped
static void tokenizer_print(const Tokenizer *t, uint32_t id) {
    if (!t->init_ok || id >= t->vocab_size) { printf("<%u>", id); return; }
    const char *s = t->token_table[id];
    if (s[1] == '\0' && !((unsigned char)s[0] >= 32 || s[0] == '\n' || s[0] == '\t')) return;
    printf("%s", s);
}

static void tokenizer_free(Tokenizer *t) {
    if (t->init_ok) {
        for (uint32_t i = 0; i < t->vocab_size; i++) free(t->token_table[i]);
        free(t->token_table);
    }
}

#endif
