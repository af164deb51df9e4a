"""
Per-kernel GPU time from `ncu --metrics gpu__time_duration.sum --print-summary per-kernel --csv`
(dev/gpu_check.sh ncu): one line per kernel name, total microseconds, launches, share of the total.
    python3 dev/ncu_summary.py out/ncu_residual.csv
"""
import csv
import re
import signal
import sys


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet under | head
    if len(sys.argv) != 2:
        sys.exit("usage: ncu_summary.py FILE.csv")
    rows = []
    with open(sys.argv[1], newline="") as f:
        lines = [l for l in f if l.startswith('"')]   # ncu prints its own log lines before the table
    for r in csv.DictReader(lines):
        name = r.get("Kernel Name") or r.get("Function Name") or "?"
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "")
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}.get(unit, 1.0)
        total = float(r["Sum"].replace(",", "")) if r.get("Sum") else float(r["Average"].replace(",", "")) * int(r["Invocations"])
        rows.append((total * scale, int(r.get("Invocations", "1")), re.sub(r"\(.*", "", name)[:70]))
    rows.sort(reverse=True)
    tot = sum(r[0] for r in rows)
    print(f"{'total us':>10s} {'calls':>6s} {'share':>6s}  kernel   (all kernels: {tot / 1e3:.2f} ms)")
    for t, n, name in rows:
        print(f"{t:10.1f} {n:6d} {100 * t / tot:5.1f}%  {name}")


if __name__ == "__main__":
    main()
