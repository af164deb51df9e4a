"""
CUDA trainer throughput per residual mode (a benchmark, not a test). Runs ./train_gpt_hcu for a
few steps per mode and reads its 'average step' (the first step is not timed) and peak memory
lines; with --profile it runs once more per mode with GPT_HC_PROFILE=1 for the time split.

    python3 dev/bench_cuda.py                         # d12, B=16, T=1024, all modes
    python3 dev/bench_cuda.py --depth 24 --modes residual mhc:4 --profile
"""
import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, mode, n, profile=False):
    cmd = [args.trainer, "-e", f"d{args.depth}", "-H", mode, "-b", str(args.B), "-t", str(args.T),
           "-x", str(args.steps), "-v", "0", "-s", "0", "-i", args.train, "-j", args.val]
    if mode != "residual":
        cmd += ["-E", str(n)]
    env = dict(os.environ, GPT_HC_PROFILE="1" if profile else "0")
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    m = re.search(r"average step ([\d.]+) ms, (\d+) tok/s", p.stdout)
    mem = re.search(r"peak GPU memory in use: (\d+) MiB", p.stdout)
    split = p.stdout[p.stdout.find("time split"):] if profile else ""
    return float(m.group(1)), int(m.group(2)), int(mem.group(1)) if mem else -1, split


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", default="./train_gpt_hcu")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("-T", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["residual", "shc:4", "dhc:4", "mhc:4"],
                    help="mode[:n] entries, e.g. mhc:2 mhc:8")
    ap.add_argument("--train", default="data/tiny/tiny_train_*.bin")
    ap.add_argument("--val", default="data/tiny/tiny_val_*.bin")
    ap.add_argument("--profile", action="store_true", help="also print the time split per mode")
    args = ap.parse_args()
    print(f"d{args.depth} B={args.B} T={args.T} steps={args.steps} trainer={args.trainer}")
    print(f"{'mode':10s} {'ms/step':>9s} {'tok/s':>9s} {'vs residual':>12s} {'peak MiB':>9s}")
    base = None
    splits = []
    for entry in args.modes:
        mode, _, n = entry.partition(":")
        n = int(n or 4)
        ms, tps, mem, _ = run(args, mode, n)
        base = base or tps
        label = mode if mode == "residual" else f"{mode} n={n}"
        print(f"{label:10s} {ms:9.1f} {tps:9d} {tps / base:11.2f}x {mem:9d}", flush=True)
        if args.profile:
            splits.append((label, run(args, mode, n, profile=True)[3]))
    for label, split in splits:
        print(f"--- {label}: {split}")


if __name__ == "__main__":
    main()
