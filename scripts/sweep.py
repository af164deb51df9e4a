"""
Loss-gap sweep: train the same model on the same data with several residual modes and seeds,
from identical base weights (a seed gives the same base weights in every mode, SPEC.md 1), one
output folder per run, then a summary for scripts/plot_hc.py.

    python3 scripts/sweep.py --out out/sweep --modes residual shc dhc mhc -n 4 --seeds 1 2 \\
        --tune-lr 3e-4 6e-4 1.2e-3 -- -e d12 -i 'data/large/large_train_*.bin' \\
        -j 'data/large/large_val_*.bin' -b 16 -t 1024 -u 100 -q 0.1 -v 100 -s 0

Everything after `--` goes to every run of the trainer (--trainer, default ./train_gpt_hcu if
it exists, else the CPU trainer). Each run gets `-H mode -E n -R seed -l lr -o OUT/RUN`, RUN =
<mode>_n<n>_s<seed>_lr<lr> (residual: n1). With --tune-lr the baseline mode (--baseline,
default residual) first trains with the first seed at each of those learning rates; the one
with the lowest final val loss is then used for every run (the papers tune for the baseline).
A finished run (OUT/RUN/run.json) is skipped, an interrupted one resumes from its last
checkpoint (-y 1), so the same command continues a sweep. OUT/summary.json lists every run.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import die  # noqa: E402


def run_name(mode, n, seed, lr):
    return f"{mode}_n{1 if mode == 'residual' else n}_s{seed}_lr{lr:g}"


def last_val_loss(log_path):
    """the last 's:N tel:X' of a main.log as (step, loss), or None"""
    best = None
    with open(log_path) as f:
        for line in f:
            m = re.match(r"s:(\d+) tel:(\S+)", line)
            if m:
                best = (int(m.group(1)), float(m.group(2)))
    return best


def train(args, extra, mode, seed, lr):
    name = run_name(mode, args.n, seed, lr)
    d = os.path.join(args.out, name)
    rec_path = os.path.join(d, "run.json")
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        print(f"[{name}] done before: val loss {rec['val_loss']:.4f}")
        return rec
    os.makedirs(d, exist_ok=True)
    cmd = [args.trainer, "-H", mode, "-R", str(seed), "-l", f"{lr:g}", "-o", d] + extra
    if mode != "residual":
        cmd[3:3] = ["-E", str(args.n)]
    if glob.glob(os.path.join(d, "DONE_*")):
        cmd += ["-y", "1"]   # an interrupted run: continue from its last checkpoint
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    if args.dry_run:
        return None
    t0 = time.time()
    tail, avg, peak = [], None, None
    with open(os.path.join(d, "stdout.log"), "a") as out:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-5:]
            m = re.match(r"average step ([\d.]+) ms, (\d+) tok/s", line)
            if m:
                avg = (float(m.group(1)), int(m.group(2)))
            m = re.match(r"peak GPU memory in use: (\d+) MiB", line)
            if m:
                peak = int(m.group(1))
            m = re.match(r"step +(\d+)/", line)
            if line.startswith("val loss") or (m and (args.every_line or int(m.group(1)) % args.print_every == 0)):
                print(f"[{name}] {line.rstrip()}", flush=True)
        rc = p.wait()
    if rc != 0:
        die(f"run {name} failed (exit {rc}): {tail[-1] if tail else 'no output'} (log: {d}/stdout.log)")
    val = last_val_loss(os.path.join(d, "main.log"))
    if val is None:
        die(f"run {name} logged no val loss (give the trainer -v N or leave -v at its default)")
    rec = dict(name=name, mode=mode, n=1 if mode == "residual" else args.n, seed=seed, lr=lr,
               val_step=val[0], val_loss=val[1], ms_per_step=avg[0] if avg else None,
               tok_per_s=avg[1] if avg else None, peak_mib=peak, wall_s=round(time.time() - t0, 1),
               command=cmd)
    with open(rec_path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(rec_path + ".tmp", rec_path)
    if args.clean:   # checkpoints are only needed to resume; run.json (written first) marks the run finished
        for f in glob.glob(os.path.join(d, "model_*.bin")) + glob.glob(os.path.join(d, "state_*.bin")):
            os.remove(f)
    print(f"[{name}] val loss {val[1]:.4f} at step {val[0]}, "
          f"{rec['tok_per_s'] or 0:,} tok/s, {rec['wall_s']} s", flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", default=None, help="trainer binary (default ./train_gpt_hcu, else ./train_gpt_hc)")
    ap.add_argument("--out", required=True, help="output folder, one subfolder per run")
    ap.add_argument("--modes", nargs="+", default=["residual", "shc", "dhc", "mhc"])
    ap.add_argument("-n", type=int, default=4, help="streams of the HC modes (default 4)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--lr", type=float, default=6e-4, help="learning rate without --tune-lr (default 6e-4)")
    ap.add_argument("--tune-lr", nargs="+", type=float, default=None, help="learning rates to try on the baseline")
    ap.add_argument("--baseline", default="residual", help="mode the learning rate is tuned for")
    ap.add_argument("--print-every", type=int, default=100, help="echo every N-th step line (default 100)")
    ap.add_argument("--every-line", action="store_true", help="echo every step line")
    ap.add_argument("--clean", action="store_true", help="delete a run's checkpoints once it has finished")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    if args.trainer is None:
        args.trainer = "./train_gpt_hcu" if os.path.exists("./train_gpt_hcu") else "./train_gpt_hc"
    if not os.access(args.trainer, os.X_OK):
        die(f"trainer {args.trainer} not found or not executable (build it: make, or make cuda-build)")
    for m in args.modes + [args.baseline]:
        if m not in ("residual", "shc", "dhc", "mhc"):
            die(f"unknown mode '{m}' (residual | shc | dhc | mhc)")
    if not 1 <= args.n <= 8:
        die(f"-n {args.n} out of range 1..8")
    for f in ("-H", "-E", "-R", "-l", "-o", "-y"):
        if f in extra:
            die(f"trainer flag {f} is set by the sweep; leave it out after --")
    if args.print_every < 1:
        die("--print-every must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    summary = dict(trainer=args.trainer, extra=extra, n=args.n, modes=args.modes, seeds=args.seeds,
                   baseline=args.baseline, runs=[])
    lr = args.lr
    if args.tune_lr:
        tuning = []
        for t in args.tune_lr:
            rec = train(args, extra, args.baseline, args.seeds[0], t)
            if rec:
                tuning.append(dict(lr=t, val_loss=rec["val_loss"]))
                summary["runs"].append(rec)
        if tuning:
            lr = min(tuning, key=lambda r: r["val_loss"])["lr"]
            print("learning rate tuning (" + args.baseline + "): " +
                  ", ".join(f"{r['lr']:g} -> {r['val_loss']:.4f}" for r in tuning) + f"; using {lr:g}", flush=True)
        summary["lr_tuning"] = tuning
    summary["lr"] = lr
    for seed in args.seeds:
        for mode in args.modes:
            rec = train(args, extra, mode, seed, lr)
            if rec and all(r["name"] != rec["name"] for r in summary["runs"]):
                summary["runs"].append(rec)
            if not args.dry_run:   # a summary after every run: a cut-off sweep still plots
                path = os.path.join(args.out, "summary.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(summary, f, indent=1)
                os.replace(path + ".tmp", path)
    print(f"sweep done: {len(summary['runs'])} runs in {args.out}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        die(str(e))
