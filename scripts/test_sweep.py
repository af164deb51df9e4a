"""
Tests of scripts/sweep.py and scripts/plot_hc.py on the CPU trainer (tiny data, a d2 model, a
few steps per mode), and of the diagnostics they read from main.log:

    python3 scripts/test_sweep.py [--plot-python /usr/bin/python3]

- the sweep trains every mode, tunes the learning rate on the baseline, writes summary.json and
  skips finished runs when run again; bad arguments give one-line errors;
- shc's mappings are the same for every token, so the logged connection matrix must equal the
  one unfolded here from the logged mean mappings, and the logged gains the row/column sums of
  the logged single and composite maps; residual's matrix is all ones below the diagonal;
- the plot script writes every PNG (valid PNG files) and a results table with one row per run.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = []


def check(name, cond, detail=""):
    RESULTS.append(bool(cond))
    print(f"{'PASS' if cond else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def run(cmd):
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parse(log, kind, step=None):
    """{k: {key: [values]}} of the last (or given) validation step's lines of one kind"""
    out = {}
    for line in open(log):
        m = re.match(r"s:(\d+) " + kind + r" k:(\d+) (.*)", line)
        if m and (step is None or int(m.group(1)) == step):
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = {
                kv.split(":")[0]: [float(x) for x in kv.split(":")[1].split(",")] for kv in m.group(3).split()}
    return out[max(out)] if out else {}


def unfold(maps, n):
    """connection matrix from per-sublayer mappings: u_k = sum_i pre_i H_i, H' = M H + post y"""
    K = len(maps)
    W = [[1.0 if m == 0 else 0.0 for m in range(K + 1)] for _ in range(n)]
    conn = []
    for k in range(K):
        pre, post, M = maps[k]["pre"], maps[k]["post"], maps[k]["res"]
        conn.append([sum(pre[i] * W[i][m] for i in range(n)) for m in range(K + 1)])
        W = [[sum(M[i * n + j] * W[j][m] for j in range(n)) + (post[i] if m == k + 1 else 0.0)
              for m in range(K + 1)] for i in range(n)]
    conn.append([sum(W[i][m] for i in range(n)) for m in range(K + 1)])
    return conn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot-python", default="/usr/bin/python3")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sweep")
        flags = ["--", "-e", "d2", "-b", "2", "-t", "32", "-x", "8", "-v", "4", "-m", "2", "-s", "0"]
        cmd = [py, "scripts/sweep.py", "--trainer", "./train_gpt_hc", "--out", out, "--seeds", "1",
               "--tune-lr", "3e-3", "1e-2", "--clean"] + flags
        r = run(cmd)
        check("sweep runs every mode and tunes the lr", r.returncode == 0, r.stderr.strip()[-200:])
        s = json.load(open(os.path.join(out, "summary.json")))
        names = sorted(x["name"] for x in s["runs"])
        check("summary lists the tuning runs and every mode at the tuned lr",
              len(s["lr_tuning"]) == 2 and s["lr"] == min(s["lr_tuning"], key=lambda t: t["val_loss"])["lr"] and
              {x["mode"] for x in s["runs"] if x["lr"] == s["lr"]} == {"residual", "shc", "dhc", "mhc"}, str(names))
        check("finished runs keep no checkpoints (--clean)",
              not any(f.startswith(("model_", "state_")) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))
                      for f in os.listdir(os.path.join(out, d))))
        r2 = run(cmd)
        check("a second sweep skips the finished runs", r2.returncode == 0 and "done before" in r2.stdout and
              "train_gpt_hc -H" not in r2.stdout, r2.stdout.strip()[-200:])
        lr = f"{s['lr']:g}"
        shc_log = os.path.join(out, f"shc_n4_s1_lr{lr}", "main.log")
        maps, conn, gains = parse(shc_log, "map"), parse(shc_log, "conn"), parse(shc_log, "gain")
        ref = unfold(maps, 4)
        err = max(abs(conn[k]["w"][m] - ref[k][m]) for k in conn for m in range(len(ref[k])))
        check("shc: logged connection matrix = unfolded logged mappings", len(conn) == 5 and err < 1e-4, f"max err {err:.2e}")
        gerr = 0.0
        for k in gains:
            for key, mk in (("fwd", "res"), ("cfwd", "comp")):
                M = maps[k][mk]
                gerr = max(gerr, abs(gains[k][key][0] - max(abs(sum(M[i * 4:i * 4 + 4])) for i in range(4))))
            for key, mk in (("bwd", "res"), ("cbwd", "comp")):
                M = maps[k][mk]
                gerr = max(gerr, abs(gains[k][key][0] - max(abs(sum(M[i::4])) for i in range(4))))
        check("shc: logged gains = row/column sums of the logged maps", len(gains) == 4 and gerr < 1e-4, f"max err {gerr:.2e}")
        rconn = parse(os.path.join(out, f"residual_n1_s1_lr{lr}", "main.log"), "conn")
        check("residual: connection matrix is all ones on and below the diagonal",
              all(rconn[k]["w"][m] == (1.0 if m <= k else 0.0) for k in rconn for m in range(5)))
        mgain = parse(os.path.join(out, f"mhc_n4_s1_lr{lr}", "main.log"), "gain")
        check("mhc: composite forward gain is 1 (Hres rows sum to 1)",
              all(abs(mgain[k]["cfwd"][0] - 1) < 1e-4 for k in mgain), str([mgain[k]["cfwd"][0] for k in mgain]))

        # bad input: one line on stderr, non-zero exit
        for what, c in [("trainer flag owned by the sweep", [py, "scripts/sweep.py", "--out", out, "--", "-H", "shc"]),
                        ("unknown mode", [py, "scripts/sweep.py", "--out", out, "--modes", "hc"]),
                        ("missing trainer", [py, "scripts/sweep.py", "--trainer", "./nope", "--out", out])]:
            r = run(c)
            check(f"sweep rejects {what}", r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1,
                  r.stderr.strip())

        if subprocess.run([args.plot_python, "-c", "import matplotlib"], capture_output=True).returncode != 0:
            check(f"matplotlib importable by {args.plot_python} (apt-get install python3-matplotlib)", False)
        else:
            plots = os.path.join(tmp, "plots")
            r = run([args.plot_python, "scripts/plot_hc.py", out, "--out", plots, "--title", "test"])
            check("plot script runs", r.returncode == 0, (r.stderr or r.stdout).strip()[-300:])
            want = ["loss_gap", "grad_norm", "val_loss", "gains", "gains_steps", "mappings", "connections"]
            ok = all(open(os.path.join(plots, w + ".png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
                     for w in want if os.path.exists(os.path.join(plots, w + ".png")))
            check("every figure is a PNG", ok and all(os.path.exists(os.path.join(plots, w + ".png")) for w in want))
            table = open(os.path.join(plots, "results.md")).read() if os.path.exists(os.path.join(plots, "results.md")) else ""
            check("results table: one row per run at the tuned lr and a gap for each HC mode",
                  sum(1 for ln in table.splitlines() if re.match(r"\| \w+_n\d_s\d", ln)) == 4 and
                  len(re.findall(r"\| [+-]\d\.\d{4} \|", table)) >= 6, table[:400])
            r = run([args.plot_python, "scripts/plot_hc.py", tmp + "/nothing"])
            check("plot script rejects a folder without runs", r.returncode == 1 and r.stderr.startswith("error: "), r.stderr.strip())
    failed = RESULTS.count(False)
    print(f"sweep: {len(RESULTS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
