/*
The command-line driver shared by train_gpt_hc.c (CPU) and train_gpt_hc.cu (CUDA): flags, data,
the training loop, validation and diagnostics, sampling, checkpoints and exact resume. Both
trainers give the same CLI and write the same files. It uses only this model interface:
  gpt_build_fresh, gpt_build_from_checkpoint, gpt_ensure_activations, gpt_forward (host token
  arrays; sets mean_loss), gpt_zero_grad, gpt_backward, gpt_grad_norm, gpt_update, gpt_diagnostics,
  gpt_sample, gpt_host_state, gpt_set_moments, gpt_free, gpt_device_description, gpt_step_done,
  gpt_print_report, and for runs of several processes (data parallel; the CPU trainer runs one)
  gpt_multi_init, gpt_multi_finish, gpt_sync_grads (average the gradients over the processes) and
  multi_sum (add host values over the processes). gpt_host_state is collective: every process
  calls it; process 0 alone prints, writes main.log and checkpoints.
*/
#ifndef GPT_HC_TRAIN_MAIN_H
#define GPT_HC_TRAIN_MAIN_H

static void usage(void) {
    fprintf(stderr,
        "usage: ./" TRAINER_NAME " [options]\n"
        "data and model\n"
        "  -i <glob>   train shards (default data/tiny/tiny_train_*.bin)\n"
        "  -j <glob>   val shards (default data/tiny/tiny_val_*.bin)\n"
        "  -e <init>   a checkpoint file, or dN for a fresh GPT-2 of depth N as in llm.c (d12 124M,\n"
        "              d24 350M: C=1024, d36, d48; other N: C=64N, N heads; vocab 50257, max T 1024);\n"
        "              default d4\n"
        "  -H <mode>   residual | shc | dhc | mhc (fresh models; default residual)\n"
        "  -E <n>      expansion rate: streams, 1..8 (default 4 for shc/dhc/mhc; residual is 1)\n"
        "  -K <iters>  Sinkhorn-Knopp iterations for mhc, 1..1000 (default 20)\n"
        "  -R <seed>   RNG seed of a fresh model (default 1337)\n"
        "  -z <path>   tokenizer file for samples (default data/gpt2_tokenizer.bin)\n"
        "training\n"
        "  -b <int>    micro-batch size B (default 4)\n"
        "  -t <int>    sequence length T (default 64)\n"
        "  -d <int>    total batch size in tokens, a multiple of B*T (default B*T)\n"
        "  -x <int>    steps (default: one epoch of the train shards; 0: evaluate and sample only)\n"
        "  -l <float>  learning rate (default 3e-4)\n"
        "  -u <int>    warmup steps (default 0)\n"
        "  -q <float>  final learning rate as a fraction of -l, cosine decay (default 1.0: constant)\n"
        "  -c <float>  weight decay on the 2-D base matrices (default 0.1)\n"
        "  -G <float>  gradient clipping norm, 0 = off (default 1.0)\n"
        "  -r <Lr>     recomputation (mHC paper 4.3.2; CUDA trainer, HC modes): keep the streams only\n"
        "              every Lr sublayers and recompute the rest in the backward; auto = the paper's\n"
        "              sqrt(nK/(n+2)) for K sublayers; default 1 (keep all; the CPU trainer always does)\n"
        "evaluation, output\n"
        "  -v <int>    validate every N steps (default 20; 0 = never)\n"
        "  -m <int>    max val batches (default 20)\n"
        "  -s <int>    sample every N steps (default 20; 0 = never)\n"
        "  -g <int>    tokens to generate (default 64)\n"
        "  -o <dir>    output directory for main.log and checkpoints (default none)\n"
        "  -n <int>    checkpoint every N steps, 0 = only at the end (default 0; needs -o)\n"
        "  -y <0|1>    resume from the latest checkpoint in -o (default 0)\n"
        "several GPUs (CUDA trainer; data parallel over NCCL, see README)\n"
        "  -pn <int>   processes, one per GPU (default 1, or mpirun's count); without -pr this\n"
        "              starts all of them on this machine\n"
        "  -pr <int>   this process's rank, 0..pn-1 (for launching each process yourself)\n"
        "  -pi <how>   rendezvous of the processes: mpi | fs:<shared dir> | tcp:<host of rank 0>:<port>\n"
        "  -pg <int>   GPUs per node: GPU = rank %% pg (default: the machine's GPU count)\n"
        "  -pz <0|1>   ZeRO stage 1, AdamW state sharded over the processes (default 1)\n"
        "  -h          this help\n");
}

static int parse_int(const char *flag, const char *s, int lo, int hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0') die("flag %s wants an integer, got '%s'", flag, s);
    if (v < lo || v > hi) die("flag %s = %ld out of range [%d, %d]", flag, v, lo, hi);
    return (int)v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    float v = strtof(s, &end);
    if (*s == '\0' || *end != '\0' || v != v) die("flag %s wants a number, got '%s'", flag, s);
    if (v < lo || v > hi) die("flag %s = %g out of range [%g, %g]", flag, v, lo, hi);
    return v;
}

// -d must split into whole micro-batches of B*T on every process (-1: not given, B*T*processes)
static void check_total_batch(int total_batch, int B, int T, int world) {
    if (world < 1) world = 1;
    if (total_batch == -1 || total_batch % (B * T * world) == 0) return;
    if (world == 1) die("-d %d is not a multiple of B*T = %d", total_batch, B * T);
    die("-d %d is not a multiple of B*T*processes = %d*%d*%d", total_batch, B, T, world);
}

// GPT-2 sizes by depth as llm.c names them (d12 = 124M, d24 = 350M, d36 = 774M, d48 = 1558M);
// other depths get 64 channels per layer and one head per 64 channels
static void depth_to_shape(int depth, int *channels, int *heads) {
    switch (depth) {
        case 24: *channels = 1024; *heads = 16; return;
        case 36: *channels = 1280; *heads = 20; return;
        case 48: *channels = 1600; *heads = 25; return;
        case 60: *channels = 1920; *heads = 30; return;
        case 72: *channels = 2880; *heads = 30; return;
        default: *channels = 64 * depth; *heads = depth;
    }
}

static void log_values(FILE *f, const char *key, const double *v, int count) {
    fprintf(f, " %s:", key);
    for (int i = 0; i < count; i++) fprintf(f, i ? ",%.6g" : "%.6g", v[i]);
}

// main.log lines of one validation step (docs/FORMATS.md)
static void log_diagnostics(FILE *f, int step, const Diagnostics *d) {
    int K = d->K, n = d->n;
    for (int k = 0; k < K; k++)
        fprintf(f, "s:%d gain k:%d fwd:%.6f bwd:%.6f cfwd:%.6f cbwd:%.6f\n", step, k, d->fwd[k], d->bwd[k], d->cfwd[k], d->cbwd[k]);
    for (int k = 0; k < K; k++) {
        fprintf(f, "s:%d map k:%d", step, k);
        log_values(f, "pre", d->pre + k * n, n);
        log_values(f, "post", d->post + k * n, n);
        log_values(f, "res", d->res + k * n * n, n * n);
        log_values(f, "comp", d->comp + k * n * n, n * n);
        fprintf(f, "\n");
    }
    for (int k = 0; k <= K; k++) {
        fprintf(f, "s:%d conn k:%d", step, k);
        log_values(f, "w", d->conn + k * (K + 1), K + 1);
        fprintf(f, "\n");
    }
}

// the latest step with a complete checkpoint (DONE marker) in dir, or -1
static int latest_checkpoint(const char *dir) {
    char pattern[4096];
    snprintf(pattern, sizeof pattern, "%s/DONE_*", dir);
    glob_t g;
    int best = -1;
    if (glob(pattern, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) {
            const char *base = strrchr(g.gl_pathv[i], '/');
            int s;
            if (base && sscanf(base + 1, "DONE_%d", &s) == 1 && s > best) best = s;
        }
        globfree(&g);
    }
    return best;
}

// collective: every process gathers the state, process 0 writes it
static void save_checkpoint(GPTHC *model, const char *dir, int step, const DataLoader *dl, uint64_t rng, int rank, int world) {
    char path[4096];
    const float *params, *m, *v;
    gpt_host_state(model, &params, &m, &v);
    if (rank != 0) return;
    snprintf(path, sizeof path, "%s/model_%08d.bin", dir, step);
    write_model_file(path, &model->config, params);
    OptimizerStateHeader s = {step, model->num_parameters, dl->shard_index, dl->pos, rng, world};
    float *zeros = NULL;
    if (m == NULL) zeros = (float *)callocCheck(model->num_parameters, sizeof(float));
    snprintf(path, sizeof path, "%s/state_%08d.bin", dir, step);
    write_state_file(path, &s, m ? m : zeros, v ? v : zeros);
    free(zeros);
    snprintf(path, sizeof path, "%s/DONE_%08d", dir, step);   // both files are complete
    FILE *fp = fopenCheck(path, "w");
    fcloseCheck(fp, path);
    printf("saved checkpoint %s/model_%08d.bin\n", dir, step);
}

static void format_eta(char *buf, size_t len, double seconds) {
    int s = (int)seconds;
    if (s >= 3600) snprintf(buf, len, "%dh%02dm", s / 3600, (s / 60) % 60);
    else snprintf(buf, len, "%dm%02ds", s / 60, s % 60);
}

int main(int argc, char **argv) {
    const char *train_pattern = "data/tiny/tiny_train_*.bin", *val_pattern = "data/tiny/tiny_val_*.bin";
    const char *init = "d4", *out_dir = NULL, *tokenizer_path = "data/gpt2_tokenizer.bin";
    int recompute = 1, mode = -1, n_flag = -1, iters_flag = -1, B = 4, T = 64, total_batch = -1, max_steps = -1, warmup = 0;
    int val_every = 20, val_max = 20, sample_every = 20, gen_tokens = 64, ckpt_every = 0, resume = 0;
    float lr = 3e-4f, final_frac = 1.0f, weight_decay = 0.1f, grad_clip = 1.0f;
    uint64_t seed = 1337;
    int world = 0, rank = -1, gpus_per_node = 0, zero = 1;   // world 0: not given
    const char *rendezvous = NULL;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) { usage(); return 0; }
        int multi_flag = f[0] == '-' && f[1] == 'p' && strlen(f) == 3;
        if (f[0] != '-' || (strlen(f) != 2 && !multi_flag)) die("unknown argument '%s' (see -h)", f);
        if (i + 1 >= argc) die("flag %s needs a value (see -h)", f);
        const char *v = argv[++i];
        if (multi_flag) {
            switch (f[2]) {
                case 'n': world = parse_int(f, v, 1, 65536); break;
                case 'r': rank = parse_int(f, v, 0, 65535); break;
                case 'i': rendezvous = v; break;
                case 'g': gpus_per_node = parse_int(f, v, 1, 1024); break;
                case 'z': zero = parse_int(f, v, 0, 1); break;
                default: die("unknown flag %s (see -h)", f);
            }
            continue;
        }
        switch (f[1]) {
            case 'i': train_pattern = v; break;
            case 'j': val_pattern = v; break;
            case 'e': init = v; break;
            case 'H': mode = mode_from_name(v); if (mode < 0) die("-H: unknown mode '%s' (residual, shc, dhc, mhc)", v); break;
            case 'E': n_flag = parse_int(f, v, 1, MAX_STREAMS); break;
            case 'K': iters_flag = parse_int(f, v, 1, 1000); break;
            case 'R': seed = (uint64_t)parse_int(f, v, 0, 2147483647); break;
            case 'z': tokenizer_path = v; break;
            case 'b': B = parse_int(f, v, 1, 1 << 16); break;
            case 't': T = parse_int(f, v, 1, 1 << 20); break;
            case 'd': total_batch = parse_int(f, v, 1, 1 << 30); break;
            case 'x': max_steps = parse_int(f, v, 0, 1 << 30); break;
            case 'l': lr = parse_float(f, v, 0.0f, 10.0f); break;
            case 'u': warmup = parse_int(f, v, 0, 1 << 30); break;
            case 'q': final_frac = parse_float(f, v, 0.0f, 1.0f); break;
            case 'c': weight_decay = parse_float(f, v, 0.0f, 10.0f); break;
            case 'G': grad_clip = parse_float(f, v, 0.0f, 1e9f); break;
            case 'v': val_every = parse_int(f, v, 0, 1 << 30); break;
            case 'm': val_max = parse_int(f, v, 1, 1 << 30); break;
            case 's': sample_every = parse_int(f, v, 0, 1 << 30); break;
            case 'g': gen_tokens = parse_int(f, v, 1, 1 << 20); break;
            case 'o': out_dir = v; break;
            case 'n': ckpt_every = parse_int(f, v, 0, 1 << 30); break;
            case 'y': resume = parse_int(f, v, 0, 1); break;
            case 'r': recompute = strcmp(v, "auto") == 0 ? 0 : parse_int(f, v, 1, 1 << 20); break;
            default: die("unknown flag %s (see -h)", f);
        }
    }
    if (resume && out_dir == NULL) die("-y 1 (resume) needs -o <dir>");
    if (ckpt_every > 0 && out_dir == NULL) die("-n (checkpoint every) needs -o <dir>");
    check_total_batch(total_batch, B, T, world);   // -pn known: before any process starts
    // processes: may start the others (-pn without -pr) and never return in the launching one
    gpt_multi_init(&world, &rank, gpus_per_node, rendezvous, zero);
    if (world > 1) g_die_rank = rank;
    if (rank > 0 && freopen("/dev/null", "w", stdout) == NULL) die("cannot silence stdout");   // process 0 prints
    if (total_batch == -1) total_batch = B * T * world;
    check_total_batch(total_batch, B, T, world);   // the count may come from mpirun
    int grad_accum = total_batch / (B * T * world);   // micro-batches per process per step

    // model: a checkpoint (resume takes the latest one in -o) or a fresh depth spec
    GPTHC model;
    int resume_step = -1;
    if (resume) resume_step = latest_checkpoint(out_dir);
    char ckpt_path[4096];
    if (resume_step >= 0) {
        snprintf(ckpt_path, sizeof ckpt_path, "%s/model_%08d.bin", out_dir, resume_step);
        init = ckpt_path;
    }
    int depth = 0;
    char extra;
    if (sscanf(init, "d%d%c", &depth, &extra) == 1) {
        if (depth < 1 || depth > 72) die("-e d%d: depth out of range 1..72", depth);
        int channels, heads;
        depth_to_shape(depth, &channels, &heads);
        GPTHCConfig cfg = {1024, 50257, 50304, depth, heads, channels, mode < 0 ? MODE_RESIDUAL : mode, 1, 20};
        cfg.n = cfg.mode == MODE_RESIDUAL ? 1 : (n_flag < 0 ? 4 : n_flag);
        if (cfg.mode == MODE_RESIDUAL && n_flag > 1) die("-E %d: residual mode has exactly one stream (use -H shc|dhc|mhc)", n_flag);
        if (iters_flag > 0) cfg.sinkhorn_iters = iters_flag;
        const char *why = config_problem(&cfg);
        if (why) die("config: %s", why);
        gpt_build_fresh(&model, &cfg, seed);
    } else {
        gpt_build_from_checkpoint(&model, init);
        GPTHCConfig *c = &model.config;
        if (mode >= 0 && mode != c->mode) die("-H %s but %s holds a %s model", MODE_NAMES[mode], init, MODE_NAMES[c->mode]);
        if (n_flag > 0 && n_flag != c->n) die("-E %d but %s has n = %d streams", n_flag, init, c->n);
        if (iters_flag > 0 && iters_flag != c->sinkhorn_iters) {
            if (c->mode != MODE_MHC) die("-K applies to mhc only; %s is a %s model", init, MODE_NAMES[c->mode]);
            c->sinkhorn_iters = iters_flag;   // a run may change t_max; the next checkpoint records it
        }
    }
    GPTHCConfig *c = &model.config;
    if (T > c->max_seq_len) die("-t %d exceeds the model's max_seq_len %d", T, c->max_seq_len);
    gpt_set_recompute(&model, recompute);
    gpt_ensure_activations(&model, B, T);   // sized for training, before any sampling forward

    DataLoader train_loader, val_loader;
    dataloader_init(&train_loader, train_pattern, B, T, c->vocab_size);
    if (val_every > 0) dataloader_init(&val_loader, val_pattern, B, T, c->vocab_size);   // -v 0: no val set needed
    int64_t train_tokens = train_loader.total_tokens;
    if (max_steps < 0) {
        max_steps = (int)(train_tokens / total_batch);
        if (max_steps < 1) max_steps = 1;
    }
    Tokenizer tokenizer;
    tokenizer_init(&tokenizer, tokenizer_path);
    uint64_t sample_rng = seed ^ 0xA5A5A5A5ull;

    // resume: optimizer state, data position, RNG
    int start_step = 0;
    if (resume_step >= 0) {
        char path[4096];
        snprintf(path, sizeof path, "%s/state_%08d.bin", out_dir, resume_step);
        OptimizerStateHeader st;
        float *m = (float *)mallocCheck(model.num_parameters * sizeof(float));
        float *v = (float *)mallocCheck(model.num_parameters * sizeof(float));
        read_state_file(path, model.num_parameters, &st, m, v);
        gpt_set_moments(&model, m, v);
        free(m);
        free(v);
        if (st.step != resume_step) die("%s: records step %d, expected %d", path, st.step, resume_step);
        dataloader_seek(&train_loader, st.shard_index, st.shard_pos);
        sample_rng = st.rng_state;
        start_step = st.step;
        printf("resumed from %s/model_%08d.bin at step %d\n", out_dir, resume_step, start_step);
    } else if (resume) {
        printf("no checkpoint in %s: starting fresh\n", out_dir);
    }

    // print the run
    size_t base = 0;
    for (int i = 0; i < P_HC_A; i++) base += model.param_sizes[i];
    char row[15][128];
    snprintf(row[0], 128, "%s", init);
    snprintf(row[1], 128, "%s", MODE_NAMES[c->mode]);
    snprintf(row[2], 128, "%d", c->n);
    snprintf(row[3], 128, "%d", c->sinkhorn_iters);
    snprintf(row[4], 128, "%d, %d, %d, %d", c->num_layers, c->num_heads, c->channels, c->max_seq_len);
    snprintf(row[5], 128, "%d (%d)", c->vocab_size, c->padded_vocab_size);
    snprintf(row[6], 128, "%zu", model.num_parameters);
    snprintf(row[7], 128, "%zu", model.num_parameters - base);
    snprintf(row[8], 128, "%d, %d, %d", B, T, grad_accum);
    snprintf(row[9], 128, "%lld", (long long)train_tokens);
    snprintf(row[10], 128, "%d", max_steps);
    snprintf(row[11], 128, "%g, %d, %g", lr, warmup, final_frac);
    snprintf(row[12], 128, "%s", gpt_device_description());
    snprintf(row[13], 128, "%d%s", world, world > 1 ? (zero ? " (ZeRO-1: AdamW state sharded)" : " (gradients all-reduced)") : "");
    snprintf(row[14], 128, "streams kept every %d sublayers", gpt_recompute(&model));
    const char *label[15] = {"model", "residual mode", "n (streams)", "sinkhorn iterations", "L, NH, C, max T",
                             "vocab (padded)", "parameters", "of which HC/mHC", "B, T, grad accum", "train tokens",
                             "steps", "lr, warmup, final", "device", "processes", "recomputation"};
    printf("+-----------------------+----------------------------------------------------+\n");
    for (int i = 0; i < 15; i++) {
        if (i == 3 && c->mode != MODE_MHC) continue;
        if (i == 14 && gpt_recompute(&model) == 1) continue;
        printf("| %-21s | %-50s |\n", label[i], row[i]);
    }
    printf("+-----------------------+----------------------------------------------------+\n");

    FILE *logf = NULL;
    if (out_dir != NULL && rank == 0) {
        makedir_check(out_dir);
        char path[4096];
        snprintf(path, sizeof path, "%s/main.log", out_dir);
        logf = fopenCheck(path, resume_step >= 0 ? "a" : "w");
    }

    Diagnostics diag;
    diagnostics_alloc(&diag, c);
    struct timespec t0, t1;
    double total_time = 0.0;
    int timed_steps = 0;
    for (int step = start_step; step <= max_steps; step++) {
        int last = step == max_steps;
        if (val_every > 0 && (step % val_every == 0 || last)) {
            double vl = 0.0;
            dataloader_reset(&val_loader);
            for (int i = 0; i < val_max; i++) {   // val batch i goes to process i % world
                if (i % world != rank) { dataloader_skip(&val_loader, 1); continue; }
                dataloader_next_batch(&val_loader);
                gpt_forward(&model, val_loader.inputs, val_loader.targets, B, T);
                vl += model.mean_loss;
                if (i == 0) gpt_diagnostics(&model, B * T, &diag);
            }
            multi_sum(&vl, 1);
            vl /= val_max;
            printf("val loss %f\n", vl);
            if (logf) {
                fprintf(logf, "s:%d tel:%f\n", step, vl);
                log_diagnostics(logf, step, &diag);
                fflush(logf);
            }
        }
        if (((sample_every > 0 && step % sample_every == 0) || (last && max_steps == 0)) && rank == 0)
            gpt_sample(&model, &tokenizer, &sample_rng, gen_tokens);
        if (last) break;

        clock_gettime(CLOCK_MONOTONIC, &t0);
        gpt_zero_grad(&model);
        double loss = 0.0;
        for (int micro = 0; micro < grad_accum; micro++) {   // batch micro*world + rank of the step
            dataloader_skip(&train_loader, rank);
            dataloader_next_batch(&train_loader);
            dataloader_skip(&train_loader, world - 1 - rank);
            gpt_forward(&model, train_loader.inputs, train_loader.targets, B, T);
            gpt_backward(&model, 1.0f / (grad_accum * world), micro == grad_accum - 1);   // summed: the mean
            loss += model.mean_loss;
        }
        gpt_sync_grads(&model);
        multi_sum(&loss, 1);
        loss /= grad_accum * world;
        float norm = gpt_grad_norm(&model);
        float scale = (grad_clip > 0.0f && norm > grad_clip) ? grad_clip / norm : 1.0f;
        float step_lr = lr_at(step, max_steps, lr, warmup, final_frac);
        gpt_update(&model, step_lr, 0.9f, 0.95f, 1e-8f, weight_decay, scale, step + 1);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        if (step > start_step) { total_time += dt; timed_steps++; }   // the first step warms caches
        gpt_step_done(&model, step > start_step);
        double avg = timed_steps > 0 ? total_time / timed_steps : dt;
        char eta[32];
        format_eta(eta, sizeof eta, avg * (max_steps - step - 1));
        printf("step %5d/%d | loss %.6f | norm %.4f | lr %.2e | %.1f ms | %.0f tok/s | eta %s\n", step + 1, max_steps,
               loss, norm, step_lr, dt * 1000, total_batch / dt, eta);
        fflush(stdout);
        if (logf) { fprintf(logf, "s:%d trl:%f lr:%f norm:%f\n", step + 1, loss, step_lr, norm); fflush(logf); }
        if (out_dir != NULL && ((ckpt_every > 0 && (step + 1) % ckpt_every == 0) || step + 1 == max_steps))
            save_checkpoint(&model, out_dir, step + 1, &train_loader, sample_rng, rank, world);
    }
    gpt_multi_finish();
    if (timed_steps > 0) printf("average step %.1f ms, %.0f tok/s\n", total_time / timed_steps * 1000, total_batch * timed_steps / total_time);
    gpt_print_report(&model, timed_steps, total_time * 1000);
    if (logf) fclose(logf);
    diagnostics_free(&diag);
    dataloader_free(&train_loader);
    if (val_every > 0) dataloader_free(&val_loader);
    tokenizer_free(&tokenizer);
    gpt_free(&model);
    return 0;
}

#endif
