"""
CPU trainer throughput per residual mode (a benchmark, not a test): runs ./train_gpt_hc for a
few steps on the tiny data and reads its 'average step' line (the first step is not timed).

    python3 dev/bench_cpu.py                    # d6 and d2, all modes, B=4 T=64
    python3 dev/bench_cpu.py --depths 6 --steps 20 --threads 2
"""
import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # dev/.. = the repository
MODES = [("residual", 1), ("shc", 4), ("dhc", 4), ("mhc", 4), ("mhc", 2)]


def run(depth, mode, n, args):
    cmd = ["./train_gpt_hc", "-e", f"d{depth}", "-H", mode, "-b", str(args.B), "-t", str(args.T),
           "-x", str(args.steps), "-v", "0", "-s", "0"]
    if mode != "residual":
        cmd += ["-E", str(n)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    m = re.search(r"average step ([\d.]+) ms, (\d+) tok/s", p.stdout)
    if not m:
        sys.exit(f"error: no 'average step' line from {' '.join(cmd)}")
    return float(m.group(1)), int(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[6, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is not timed)")
    if not os.access(os.path.join(REPO, "train_gpt_hc"), os.X_OK):
        sys.exit("error: ./train_gpt_hc is not built (run make)")
    print(f"B={args.B} T={args.T} steps={args.steps} OpenMP threads={args.threads}")
    print(f"{'model':6s} {'mode':10s} {'ms/step':>9s} {'tok/s':>8s} {'vs residual':>12s}")
    for depth in args.depths:
        base = None
        for mode, n in MODES:
            ms, tps = run(depth, mode, n, args)
            base = base or tps
            label = mode if mode == "residual" else f"{mode} n={n}"
            print(f"d{depth:<5d} {label:10s} {ms:9.1f} {tps:8d} {tps / base:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
