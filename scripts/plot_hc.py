"""
Figures and a results table from a sweep folder (scripts/sweep.py) or any run folders with a
main.log, as in the HC and mHC papers. Needs matplotlib (Debian: apt-get install
python3-matplotlib, then run with /usr/bin/python3).

    /usr/bin/python3 scripts/plot_hc.py out/sweep                 # PNGs + results.md in out/sweep/plots
    /usr/bin/python3 scripts/plot_hc.py out/stab --title "d24, lr 3e-3"

Writes into --out (default FOLDER/plots):
  loss_gap.png     train-loss gap to the baseline vs steps, smoothed (mHC paper Fig. 5a)
  grad_norm.png    gradient norm vs steps (Fig. 5b)
  val_loss.png     val loss vs steps per mode and seed
  gains.png        Amax gain magnitude (forward: max |row sum|, backward: max |column sum|) of
                   each sublayer's mapping and of the composite M_k ... M_0 at the last
                   validation (Fig. 3 and 7)
  gains_steps.png  the largest composite gain over the sublayers at every validation (stability)
  mappings.png     heat maps of learned mappings: H_res of the first, middle and last sublayer,
                   the composite to the last, and H_pre / H_post of every sublayer (Fig. 8)
  connections.png  the unfolded network: weight of the embedding and of every sublayer's output
                   in every sublayer's input (HC paper's connection matrices)
  results.md       final val loss per run, gap to the baseline of the same seed, tok/s, memory
"""
import argparse
import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import die  # noqa: E402

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
except ImportError:
    print("error: matplotlib is not installed for this python (apt-get install python3-matplotlib, "
          "then run with /usr/bin/python3)", file=sys.stderr)
    sys.exit(1)

MODE_ORDER = ["residual", "shc", "dhc", "mhc"]
COLORS = {"residual": "tab:gray", "shc": "tab:blue", "dhc": "tab:orange", "mhc": "tab:green"}


def values(s):
    return [float(v) for v in s.split(",")]


def read_log(path):
    """main.log (docs/FORMATS.md) -> dict of per-step series; a resumed run's repeated steps keep
    their last value"""
    train, val, gains, maps, conn = {}, {}, {}, {}, {}
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            m = re.match(r"s:(\d+) (\w+)(.*)", line)
            if not m:
                continue
            step, kind, rest = int(m.group(1)), m.group(2), m.group(3)
            try:
                if kind.startswith("trl"):
                    kv = dict(p.split(":") for p in line.split()[1:])
                    train[step] = (float(kv["trl"]), float(kv["norm"]))
                elif kind.startswith("tel"):
                    val[step] = float(line.split("tel:")[1])
                elif kind in ("gain", "map", "conn"):
                    kv = dict(p.split(":", 1) for p in rest.split())
                    k = int(kv.pop("k"))
                    target = {"gain": gains, "map": maps, "conn": conn}[kind]
                    target.setdefault(step, {})[k] = {key: values(v) for key, v in kv.items()}
            except (ValueError, KeyError, IndexError):
                die(f"{path}:{ln}: malformed line: {line.strip()[:80]}")
    if not train:
        die(f"{path}: no training steps logged")
    return dict(train=train, val=val, gains=gains, maps=maps, conn=conn)


def load_runs(folders):
    runs = []
    for folder in folders:
        summary = os.path.join(folder, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                s = json.load(f)
            recs = [r for r in s["runs"] if r["lr"] == s["lr"]]   # the tuning runs at other rates are left out
            dirs = [(os.path.join(folder, r["name"]), r) for r in recs]
        else:   # run folders given directly, or a folder of them
            cands = [folder] if os.path.exists(os.path.join(folder, "main.log")) else \
                sorted(os.path.dirname(p) for p in glob.glob(os.path.join(folder, "*", "main.log")))
            dirs = [(d, None) for d in cands]
        if not dirs:
            die(f"{folder}: no summary.json and no run folders with a main.log")
        for d, rec in dirs:
            if rec is None:
                rj = os.path.join(d, "run.json")
                if os.path.exists(rj):
                    with open(rj) as f:
                        rec = json.load(f)
                else:
                    m = re.match(r"(residual|shc|dhc|mhc)_n(\d+)_s(\d+)", os.path.basename(d.rstrip("/")))
                    if not m:
                        die(f"{d}: cannot tell the mode (no run.json, name not <mode>_n<n>_s<seed>...)")
                    rec = dict(name=os.path.basename(d), mode=m.group(1), n=int(m.group(2)), seed=int(m.group(3)))
            log = read_log(os.path.join(d, "main.log"))
            runs.append(dict(rec, log=log, label=rec["mode"] + ("" if rec["mode"] == "residual" else f" n={rec['n']}")))
    runs.sort(key=lambda r: (MODE_ORDER.index(r["mode"]), r["n"], r["seed"]))
    return runs


def smooth(y, w):
    if w <= 1 or len(y) < w:
        return np.asarray(y)
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    out = (c[w:] - c[:-w]) / w
    return np.concatenate([np.full(w - 1, np.nan), out])


def labels(runs):
    seen = []
    for r in runs:
        if r["label"] not in seen:
            seen.append(r["label"])
    return seen


def by_label(runs, label):
    return [r for r in runs if r["label"] == label]


def color(run):
    return COLORS[run["mode"]]


def series(run, key):
    steps = sorted(run["log"]["train"])
    col = 0 if key == "loss" else 1
    return np.array(steps), np.array([run["log"]["train"][s][col] for s in steps])


def plot_loss_gap(runs, base, out, window, title):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for lab in labels(runs):
        group = by_label(runs, lab)
        if group[0]["mode"] == base:
            continue
        gaps = []
        for r in group:
            b = [x for x in runs if x["mode"] == base and x["seed"] == r["seed"]] or \
                [x for x in runs if x["mode"] == base]
            if not b:
                continue
            s1, l1 = series(r, "loss")
            s0, l0 = series(b[0], "loss")
            common = np.intersect1d(s1, s0)
            g = l1[np.searchsorted(s1, common)] - l0[np.searchsorted(s0, common)]
            gaps.append((common, g))
        if not gaps:
            continue
        n = min(len(g[1]) for g in gaps)
        steps, mean = gaps[0][0][:n], np.mean([g[1][:n] for g in gaps], axis=0)
        ax.plot(steps, smooth(mean, window), color=color(group[0]), label=f"{lab} ({len(gaps)} seed{'s' * (len(gaps) > 1)})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(0.0, color=COLORS.get(base, "k"), lw=1, ls="--", label=f"{base} (baseline)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss - {base} train loss")
    ax.set_title(f"Train-loss gap to {base}, smoothed over {window} steps" + (f"\n{title}" if title else ""), fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_gap.png"), dpi=120)
    plt.close(fig)
    return True


def plot_lines(runs, out, fname, ylabel, title, getter, window, log_y=False):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lab in labels(runs):
        for i, r in enumerate(by_label(runs, lab)):
            x, y = getter(r)
            if len(x) == 0:
                continue
            ax.plot(x, smooth(y, window) if window > 1 else y, color=color(r), alpha=1.0 if i == 0 else 0.55,
                    lw=1.3 if i == 0 else 0.9, label=f"{lab}" if i == 0 else None,
                    marker="o" if len(x) < 30 else None, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, fname), dpi=120)
    plt.close(fig)


def last_step(d):
    return max(d) if d else None


def plot_gains(runs, out, title):
    hc = [r for r in runs if r["mode"] != "residual" and r["log"]["gains"]]
    if not hc:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (f, b, what) in zip(axes, [("fwd", "bwd", "single-layer mapping M_k"),
                                       ("cfwd", "cbwd", "composite M_k ... M_0")]):
        for lab in labels(hc):
            group = by_label(hc, lab)
            g = [r["log"]["gains"][last_step(r["log"]["gains"])] for r in group]
            K = min(len(x) for x in g)
            fw = np.mean([[x[k][f][0] for k in range(K)] for x in g], axis=0)
            bw = np.mean([[x[k][b][0] for k in range(K)] for x in g], axis=0)
            c = color(group[0])
            ax.plot(range(K), fw, color=c, marker="o", ms=3, label=f"{lab} forward")
            ax.plot(range(K), bw, color=c, ls="--", marker="s", ms=3, label=f"{lab} backward")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sublayer k (even: attention, odd: MLP)")
        ax.set_title(f"Amax gain, {what}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gain magnitude (mean over tokens and seeds)")
    axes[1].legend(fontsize=8)
    step = last_step(hc[0]["log"]["gains"])
    fig.suptitle(f"Gains at step {step}" + (f" ({title})" if title else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gains.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lab in labels(hc):
        for i, r in enumerate(by_label(hc, lab)):
            steps = sorted(r["log"]["gains"])
            fw = [max(v["cfwd"][0] for v in r["log"]["gains"][s].values()) for s in steps]
            bw = [max(v["cbwd"][0] for v in r["log"]["gains"][s].values()) for s in steps]
            a = 1.0 if i == 0 else 0.5
            ax.plot(steps, fw, color=color(r), alpha=a, marker="o", ms=3, label=f"{lab} forward" if i == 0 else None)
            ax.plot(steps, bw, color=color(r), alpha=a, ls="--", marker="s", ms=3, label=f"{lab} backward" if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max over sublayers of the composite gain")
    ax.set_title("Composite Amax gain during training" + (f" ({title})" if title else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gains_steps.png"), dpi=120)
    plt.close(fig)
    return True


def heat(ax, M, title, vmax=None, annotate=True):
    M = np.asarray(M)
    v = vmax or max(1e-9, float(np.nanmax(np.abs(M))))
    im = ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto", interpolation="nearest")
    if annotate and M.size <= 64:
        for (i, j), x in np.ndenumerate(M):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(x) > 0.6 * v else "black")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_mappings(runs, out, title):
    hc = [r for r in labels(runs) if by_label(runs, r)[0]["mode"] != "residual"]
    hc = [lab for lab in hc if by_label(runs, lab)[0]["log"]["maps"]]
    if not hc:
        return False
    fig, axes = plt.subplots(len(hc), 6, figsize=(17, 3.0 * len(hc)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1, 1, 1, 1, 1.3, 1.3]))
    for row, lab in zip(axes, hc):
        r = by_label(runs, lab)[0]
        maps = r["log"]["maps"][last_step(r["log"]["maps"])]
        K, n = len(maps), r["n"]
        mat = lambda v: np.array(v).reshape(n, n)
        for ax, k in zip(row[:3], [0, K // 2, K - 1]):
            heat(ax, mat(maps[k]["res"]), f"{lab}: H_res, sublayer {k}", vmax=1.0)
        comp = mat(maps[K - 1]["comp"])
        heat(row[3], comp, f"{lab}: composite to sublayer {K - 1}", vmax=max(1.0, float(np.abs(comp).max())))
        pre = np.array([maps[k]["pre"] for k in range(K)])
        post = np.array([maps[k]["post"] for k in range(K)])
        im = heat(row[4], pre, f"{lab}: H_pre (rows: sublayers)", annotate=False)
        row[4].set_ylabel("sublayer k")
        row[4].set_xlabel("stream")
        fig.colorbar(im, ax=row[4], fraction=0.05)
        im = heat(row[5], post, f"{lab}: H_post (rows: sublayers)", annotate=False)
        fig.colorbar(im, ax=row[5], fraction=0.05)
        row[0].set_ylabel(f"seed {r['seed']}")
    step = last_step(by_label(runs, hc[0])[0]["log"]["maps"])
    fig.suptitle(f"Learned mappings, token means of one val batch at step {step} (rows i, columns j of "
                 f"H'_i = sum_j H_res[i,j] H_j)" + (f" ({title})" if title else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mappings.png"), dpi=110)
    plt.close(fig)
    return True


def plot_connections(runs, out, title):
    labs = [lab for lab in labels(runs) if by_label(runs, lab)[0]["log"]["conn"]]
    if not labs:
        return False
    cols = min(4, len(labs))
    rows = math.ceil(len(labs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.3 * rows), squeeze=False)
    for ax, lab in zip(axes.flat, labs):
        r = by_label(runs, lab)[0]
        conn = r["log"]["conn"][last_step(r["log"]["conn"])]
        S = len(conn)
        M = np.array([conn[k]["w"] for k in range(S)])
        M[np.triu_indices(S, 1)] = np.nan   # no sublayer reads a later output
        # colours scaled to the sublayer inputs: the last row (h, a sum over n streams) may saturate
        v = float(np.nanmax(np.abs(M[:-1]))) if S > 1 else 1.0
        im = ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_title(f"{lab} (seed {r['seed']})", fontsize=10)
        ax.set_xlabel("source: 0 = embedding, j+1 = output of sublayer j")
        ax.set_ylabel("input of sublayer k (last row: h)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(labs):]:
        ax.axis("off")
    fig.suptitle("Unfolded connections: weight of each earlier output in each sublayer's input; last row: h "
                 "(colours scaled to the sublayer rows)" + (f" ({title})" if title else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "connections.png"), dpi=110)
    plt.close(fig)
    return True


def results_table(runs, base, out, pngs, title):
    lines = [f"# Results{': ' + title if title else ''}", ""]
    lines += ["| run | mode | n | seed | lr | final val loss | gap to " + base + " (same seed) | tok/s | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    final = {}
    for r in runs:
        v = r["log"]["val"]
        s = last_step(v)
        if s is None:
            continue
        final[r["name"]] = v[s]
        b = [x for x in runs if x["mode"] == base and x["seed"] == r["seed"] and x["log"]["val"]]
        gap = f"{v[s] - b[0]['log']['val'][last_step(b[0]['log']['val'])]:+.4f}" if b and r["mode"] != base else "-"
        lr = f"{r['lr']:g}" if r.get("lr") else "-"
        tps = f"{r['tok_per_s']:,}" if r.get("tok_per_s") else "-"
        mem = f"{r['peak_mib']:,}" if r.get("peak_mib") else "-"
        lines.append(f"| {r['name']} | {r['mode']} | {r['n']} | {r['seed']} | {lr} | {v[s]:.4f} (step {s}) | {gap} | {tps} | {mem} |")
    lines += ["", "| mode | seeds | mean final val loss | mean gap to " + base + " | mean tok/s |", "|---|---|---|---|---|"]
    bmean = None
    for lab in labels(runs):
        group = [r for r in by_label(runs, lab) if r["name"] in final]
        if not group:
            continue
        mv = float(np.mean([final[r["name"]] for r in group]))
        if group[0]["mode"] == base:
            bmean = mv
        tps = [r["tok_per_s"] for r in group if r.get("tok_per_s")]
        gap = f"{mv - bmean:+.4f}" if bmean is not None and group[0]["mode"] != base else "-"
        lines.append(f"| {lab} | {len(group)} | {mv:.4f} | {gap} | {f'{int(np.mean(tps)):,}' if tps else '-'} |")
    lines += [""] + [f"![{p}]({p})" for p in pngs]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="sweep folders (summary.json) or run folders (main.log)")
    ap.add_argument("--out", default=None, help="output folder (default FIRST_FOLDER/plots)")
    ap.add_argument("--baseline", default="residual")
    ap.add_argument("--smooth", type=int, default=0, help="moving-average window in steps (default: steps/25)")
    ap.add_argument("--title", default="", help="added to every figure's title")
    args = ap.parse_args()
    runs = load_runs(args.folders)
    out = args.out or os.path.join(args.folders[0], "plots")
    os.makedirs(out, exist_ok=True)
    nsteps = max(len(r["log"]["train"]) for r in runs)
    window = args.smooth or max(1, nsteps // 25)
    pngs = []
    if plot_loss_gap(runs, args.baseline, out, window, args.title):
        pngs.append("loss_gap.png")
    plot_lines(runs, out, "grad_norm.png", "gradient norm (before clipping)",
               "Gradient norm" + (f" ({args.title})" if args.title else "") + f", smoothed over {window} steps",
               lambda r: series(r, "norm"), window)
    pngs.append("grad_norm.png")
    plot_lines(runs, out, "val_loss.png", "val loss", "Validation loss" + (f" ({args.title})" if args.title else ""),
               lambda r: (np.array(sorted(r["log"]["val"])), np.array([r["log"]["val"][s] for s in sorted(r["log"]["val"])])), 1)
    pngs.append("val_loss.png")
    if plot_gains(runs, out, args.title):
        pngs += ["gains.png", "gains_steps.png"]
    if plot_mappings(runs, out, args.title):
        pngs.append("mappings.png")
    if plot_connections(runs, out, args.title):
        pngs.append("connections.png")
    results_table(runs, args.baseline, out, pngs, args.title)
    print(f"wrote {', '.join(pngs)} and results.md to {out} ({len(runs)} runs)")


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        die(str(e))
