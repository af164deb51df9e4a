"""
CUDA trainer throughput per residual mode (a benchmark, not a test). Runs ./train_gpt_hcu for a
few steps per mode and reads its 'average step' (the first step is not timed) and peak memory
lines; with --profile it runs once more per mode with GPT_HC_PROFILE=1 for the time split.

    python3 dev/bench_cuda.py                         # d12, B=16, T=1024, all modes
    python3 dev/bench_cuda.py --depth 24 --modes residual mhc:4 --profile
    python3 dev/bench_cuda.py --depth 12 24 --modes residual shc:2 shc:4 shc:8 dhc:2 dhc:4 dhc:8 mhc:2 mhc:4 mhc:8
    python3 dev/bench_cuda.py --depth 12 24 --modes residual mhc:4 mhc:4:rauto   # with recomputation (-r auto)
    python3 dev/bench_cuda.py --depth 12 24 --modes residual mhc:4 --gpus 1 2   # data-parallel scaling

With --gpus, each entry runs on each GPU count with B per GPU fixed (total batch = GPUs x B x T)
and the table adds the scaling efficiency: tok/s on G GPUs / (G x tok/s on 1 GPU).
"""
import argparse
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_entry(entry):
    """mode[:n[:r<Lr>]] -> (mode, n, Lr or None, label); r<Lr> is the recomputation flag (-r), e.g. rauto"""
    parts = entry.split(":")
    mode, n = parts[0], int(parts[1]) if len(parts) > 1 and parts[1] else 4
    rc = parts[2][1:] if len(parts) > 2 and parts[2].startswith("r") else None
    label = mode if mode == "residual" else f"{mode} n={n}" + (f" r={rc}" if rc else "")
    return mode, n, rc, label


def run(args, depth, mode, n, profile=False, gpus=1, rc=None):
    cmd = [args.trainer, "-e", f"d{depth}", "-H", mode, "-b", str(args.B), "-t", str(args.T),
           "-x", str(args.steps), "-v", "0", "-s", "0", "-i", args.train, "-j", args.val]
    if mode != "residual":
        cmd += ["-E", str(n)]
    if rc:
        cmd += ["-r", rc]
    if gpus > 1:
        cmd += ["-pn", str(gpus), "-d", str(gpus * args.B * args.T)] + args.multi_flags.split()
    env = dict(os.environ, GPT_HC_PROFILE="1" if profile else "0")
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:   # e.g. out of memory at a large n: report and go on with the next entry
        return None, (p.stderr.strip().splitlines() or ["?"])[-1]
    m = re.search(r"average step ([\d.]+) ms, (\d+) tok/s", p.stdout)
    mem = re.search(r"peak GPU memory in use: (\d+) MiB", p.stdout)
    split = p.stdout[p.stdout.find("time split"):] if profile else ""
    return float(m.group(1)), int(m.group(2)), int(mem.group(1)) if mem else -1, split


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", default="./train_gpt_hcu")
    ap.add_argument("--depth", type=int, nargs="+", default=[12], help="one or more depths (one table each)")
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("-T", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["residual", "shc:4", "dhc:4", "mhc:4"],
                    help="mode[:n[:r<Lr>]] entries, e.g. mhc:2 mhc:8 mhc:4:rauto (with recomputation, -r auto)")
    ap.add_argument("--train", default="data/tiny/tiny_train_*.bin")
    ap.add_argument("--val", default="data/tiny/tiny_val_*.bin")
    ap.add_argument("--profile", action="store_true", help="also print the time split per mode")
    ap.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts for a scaling table, e.g. 1 2")
    ap.add_argument("--multi-flags", default="", help="extra flags for the runs of several GPUs, e.g. '-pz 0'")
    args = ap.parse_args()
    if args.gpus:
        return scaling(args)
    splits = []
    for depth in args.depth:
        print(f"d{depth} B={args.B} T={args.T} steps={args.steps} trainer={args.trainer}")
        print(f"{'mode':16s} {'ms/step':>9s} {'tok/s':>9s} {'vs residual':>12s} {'peak MiB':>9s}")
        base = None
        for entry in args.modes:   # ratios are to the first entry (residual by default)
            mode, n, rc, label = parse_entry(entry)
            r = run(args, depth, mode, n, rc=rc)
            if r[0] is None:
                print(f"{label:16s} failed: {r[1]}", flush=True)
                continue
            ms, tps, mem, _ = r
            base = base or tps
            print(f"{label:16s} {ms:9.1f} {tps:9d} {tps / base:11.2f}x {mem:9d}", flush=True)
            if args.profile:
                splits.append((f"d{depth} {label}", run(args, depth, mode, n, profile=True, rc=rc)[-1]))
    for label, split in splits:
        print(f"--- {label}: {split}")


def scaling(args):
    for depth in args.depth:
        print(f"d{depth} B={args.B} per GPU, T={args.T}, steps={args.steps}, trainer={args.trainer} {args.multi_flags}")
        print(f"{'mode':16s} {'GPUs':>4s} {'ms/step':>9s} {'tok/s':>9s} {'efficiency':>10s} {'peak MiB':>9s}")
        for entry in args.modes:
            mode, n, rc, label = parse_entry(entry)
            one = None
            for g in args.gpus:
                r = run(args, depth, mode, n, gpus=g, rc=rc)
                if r[0] is None:
                    print(f"{label:16s} {g:4d} failed: {r[1]}", flush=True)
                    continue
                ms, tps, mem, _ = r
                if g == 1:
                    one = tps
                eff = f"{tps / (g * one):10.3f}" if one else f"{'-':>10s}"
                print(f"{label:16s} {g:4d} {ms:9.1f} {tps:9d} {eff} {mem:9d}", flush=True)


if __name__ == "__main__":
    main()
