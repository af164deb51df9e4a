/*
Token-shard data loader (llm.c's shard format, docs/FORMATS.md): sequential batches of B*T
inputs and their next-token targets over a glob of shards, in sorted file-name order, wrapping
around at the end. The position (shard index, token offset) is saved in the optimizer state, so
a resumed run reads exactly the batches the uninterrupted run would have read.
Every shard's header is read at init, so the loader can step over batches without reading their
tokens (dataloader_skip): in a run of W processes, micro-batch j of a step is the (j*W + rank)-th
batch of the one sequential stream, so the data a step sees does not depend on W.
Shards are validated: every header at init, the tokens (each id < the model's vocab size) when
the shard is first read.
*/
#ifndef GPT_HC_DATALOADER_H
#define GPT_HC_DATALOADER_H

#include <glob.h>
#include <stdint.h>
#include "utils.h"

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1

typedef struct {
    glob_t glob_result;
    int num_shards;
    int64_t *shard_ntok;   // tokens per shard, from the headers
    int64_t total_tokens;
    int B, T;
    int vocab_size;
    int shard_index;       // the shard the next batch is read from
    int64_t pos;           // token offset of the next batch in that shard
    int loaded;            // which shard's tokens are in memory (-1: none)
    uint16_t *tokens;      // the whole loaded shard
    int *inputs, *targets; // B*T each
} DataLoader;

// validates the header and size of shard `index`; returns its token count
static int64_t dataloader_read_header(DataLoader *dl, int index) {
    const char *path = dl->glob_result.gl_pathv[index];
    FILE *fp = fopenCheck(path, "rb");
    long size = file_size_of(fp);
    int h[256];
    if (size < 1024) die("%s: truncated header (%ld bytes), not a token shard", path, size);
    freadCheck(h, sizeof(int), 256, fp, path);
    fclose(fp);
    if (h[0] != SHARD_MAGIC) die("%s: bad magic %d (not an llm.c token shard)", path, h[0]);
    if (h[1] != SHARD_VERSION) die("%s: unsupported shard version %d (expected %d)", path, h[1], SHARD_VERSION);
    int64_t n = h[2];
    if (n < 0 || size != 1024 + 2 * n) die("%s: header says %lld tokens but the file has %ld bytes (truncated?)", path, (long long)n, size);
    if (n < (int64_t)dl->B * dl->T + 1)
        die("%s: %lld tokens, fewer than one batch of B*T+1 = %d", path, (long long)n, dl->B * dl->T + 1);
    return n;
}

static void dataloader_load_shard(DataLoader *dl, int index) {
    const char *path = dl->glob_result.gl_pathv[index];
    int64_t n = dl->shard_ntok[index];
    FILE *fp = fopenCheck(path, "rb");
    fseek(fp, 1024, SEEK_SET);
    free(dl->tokens);
    dl->tokens = (uint16_t *)mallocCheck((size_t)n * sizeof(uint16_t));
    freadCheck(dl->tokens, sizeof(uint16_t), (size_t)n, fp, path);
    fclose(fp);
    for (int64_t i = 0; i < n; i++) {
        if (dl->tokens[i] >= dl->vocab_size)
            die("%s: token id %d at position %lld is >= the model's vocab size %d", path, dl->tokens[i], (long long)i, dl->vocab_size);
    }
    dl->loaded = index;
}

static void dataloader_init(DataLoader *dl, const char *pattern, int B, int T, int vocab_size) {
    memset(dl, 0, sizeof(*dl));
    dl->B = B; dl->T = T; dl->vocab_size = vocab_size;
    int r = glob(pattern, 0, NULL, &dl->glob_result);
    if (r != 0 || dl->glob_result.gl_pathc == 0) die("no data shards match '%s' (run 'make data' or check -i/-j)", pattern);
    dl->num_shards = (int)dl->glob_result.gl_pathc;
    dl->shard_ntok = (int64_t *)mallocCheck(dl->num_shards * sizeof(int64_t));
    for (int i = 0; i < dl->num_shards; i++) {
        dl->shard_ntok[i] = dataloader_read_header(dl, i);
        dl->total_tokens += dl->shard_ntok[i];
    }
    dl->inputs = (int *)mallocCheck((size_t)B * T * sizeof(int));
    dl->targets = (int *)mallocCheck((size_t)B * T * sizeof(int));
    dl->loaded = -1;
    dataloader_load_shard(dl, 0);   // the first shard's tokens are checked up front
    dl->shard_index = 0;
    dl->pos = 0;
}

// continue at (shard index, token offset), as saved in an optimizer state
static void dataloader_seek(DataLoader *dl, int shard_index, int64_t pos) {
    if (shard_index >= dl->num_shards) die("resume position: shard %d but only %d shards match", shard_index, dl->num_shards);
    if (pos > dl->shard_ntok[shard_index]) die("resume position %lld is past the end of shard %d", (long long)pos, shard_index);
    dl->shard_index = shard_index;
    dl->pos = pos;
}

static void dataloader_reset(DataLoader *dl) { dataloader_seek(dl, 0, 0); }

// the start of the next batch: the current shard, or the next one (wrapping around) when fewer
// than B*T+1 tokens are left; advances past it
static const uint16_t *dataloader_advance(DataLoader *dl, int load) {
    int64_t need = (int64_t)dl->B * dl->T + 1;
    if (dl->pos + need > dl->shard_ntok[dl->shard_index]) {
        dl->shard_index = (dl->shard_index + 1) % dl->num_shards;
        dl->pos = 0;
    }
    const uint16_t *t = NULL;
    if (load) {
        if (dl->loaded != dl->shard_index) dataloader_load_shard(dl, dl->shard_index);
        t = dl->tokens + dl->pos;
    }
    dl->pos += (int64_t)dl->B * dl->T;
    return t;
}

// step over `count` batches (those of other processes) without reading them
static void dataloader_skip(DataLoader *dl, int count) {
    for (int i = 0; i < count; i++) dataloader_advance(dl, 0);
}

static void dataloader_next_batch(DataLoader *dl) {
    const uint16_t *t = dataloader_advance(dl, 1);
    for (int i = 0; i < dl->B * dl->T; i++) {
        dl->inputs[i] = t[i];
        dl->targets[i] = t[i + 1];
    }
}

static void dataloader_free(DataLoader *dl) {
    globfree(&dl->glob_result);
    free(dl->shard_ntok);
    free(dl->tokens);
    free(dl->inputs);
    free(dl->targets);
}

#endif
