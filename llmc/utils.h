/*
Checked wrappers for file and memory operations, shared by the C and CUDA trainers.
Every failure prints one line "error: ..." naming the file and line, and exits 1.
*/
#ifndef GPT_HC_UTILS_H
#define GPT_HC_UTILS_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

// this process's rank in a multi-process run (-1: a single process), named in error lines
static int g_die_rank = -1;

// print "error: <message>" and exit non-zero: the one way bad input ends a program
static inline void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    if (g_die_rank >= 0) fprintf(stderr, "rank %d: ", g_die_rank);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static inline FILE *fopen_check(const char *path, const char *mode, const char *file, int line) {
    FILE *fp = fopen(path, mode);
    if (fp == NULL) die("cannot open %s (%s) [%s:%d]", path, strerror(errno), file, line);
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

static inline void fread_check(void *ptr, size_t size, size_t nmemb, FILE *fp, const char *what,
                               const char *file, int line) {
    size_t got = fread(ptr, size, nmemb, fp);
    if (got != nmemb) {
        if (feof(fp)) die("%s: unexpected end of file (truncated?) [%s:%d]", what, file, line);
        die("%s: read failed (%s) [%s:%d]", what, strerror(errno), file, line);
    }
}
#define freadCheck(ptr, size, nmemb, fp, what) fread_check(ptr, size, nmemb, fp, what, __FILE__, __LINE__)

static inline void fwrite_check(const void *ptr, size_t size, size_t nmemb, FILE *fp, const char *what,
                                const char *file, int line) {
    if (fwrite(ptr, size, nmemb, fp) != nmemb) die("%s: write failed (%s) [%s:%d]", what, strerror(errno), file, line);
}
#define fwriteCheck(ptr, size, nmemb, fp, what) fwrite_check(ptr, size, nmemb, fp, what, __FILE__, __LINE__)

static inline void fclose_check(FILE *fp, const char *what, const char *file, int line) {
    if (fclose(fp) != 0) die("%s: close failed (%s) [%s:%d]", what, strerror(errno), file, line);
}
#define fcloseCheck(fp, what) fclose_check(fp, what, __FILE__, __LINE__)

static inline void *malloc_check(size_t size, const char *file, int line) {
    void *p = malloc(size);
    if (p == NULL && size > 0) die("out of host memory allocating %zu bytes [%s:%d]", size, file, line);
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static inline void *calloc_check(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n, size);
    if (p == NULL && n * size > 0) die("out of host memory allocating %zu bytes [%s:%d]", n * size, file, line);
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

static inline long file_size_of(FILE *fp) {
    long here = ftell(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, here, SEEK_SET);
    return size;
}

// rename tmp -> final (atomic on POSIX): nobody ever sees a partially written file
static inline void rename_check(const char *tmp, const char *final_path) {
    if (rename(tmp, final_path) != 0) die("cannot rename %s to %s (%s)", tmp, final_path, strerror(errno));
}

static inline void makedir_check(const char *dir) {
    struct stat st;
    if (stat(dir, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) die("output path %s exists and is not a directory", dir);
        return;
    }
    if (mkdir(dir, 0755) != 0) die("cannot create directory %s (%s)", dir, strerror(errno));
}

#endif
