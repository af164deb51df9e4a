"""
PyTorch reference of gpt_hc, written straight from ../shared/SPEC.md, in float64.

    python3 scripts/reference.py            # writes data/ref/*.bin (the committed dumps)
    python3 scripts/reference.py --check    # self-checks only, writes nothing

For each dumped config (residual, shc n=4, dhc n=4, mhc n=4, mhc n=2) it writes
  data/ref/<name>_model.bin   the dumped checkpoint (fp32 parameters): the init after 3 AdamW
                              steps on another batch (lr 1e-2), so that every HC/mHC parameter
                              has left its init and every gradient is non-zero (at init W_a = 0
                              and phi = 0 make the gradients of LNh, s_a, s_b and alpha exactly 0)
  data/ref/<name>_debug.bin   a fixed batch, logits, loss, every parameter gradient, the
                              per-token HC coefficients of every sublayer, and the losses of
                              10 AdamW steps on that batch from the dumped checkpoint (docs/FORMATS.md)
The self-checks run on the init. The dumped parameters are rounded to fp32 once (that is what
the checkpoint holds) and everything is then computed in float64, so the dumps are exact to fp32
output rounding.
"""
import argparse
import math
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formats  # noqa: E402

try:
    import torch
except ImportError:
    print("error: PyTorch is not installed (run this on a machine that has it, e.g. the GPU "
          "machine, or install Debian's python3-torch)", file=sys.stderr)
    sys.exit(1)

DT = torch.float64

# ----------------------------------------------------------------------------------------------
# parameters


def init_params(cfg, seed):
    """SPEC.md section 1 'Init' and section 2 parameter inits. Base weights come from one RNG
    stream in a fixed order, identical in every mode; HC/mHC inits are deterministic."""
    g = torch.Generator().manual_seed(seed)
    L, C, n, V = cfg["L"], cfg["C"], cfg["n"], cfg["V"]
    K = 2 * L
    p = {}
    for name, shape in formats.param_specs(cfg):
        p[name] = torch.zeros(shape, dtype=torch.float32)
    std_proj = 0.02 / math.sqrt(2 * L)
    for name in ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]:
        std = std_proj if name in ("attprojw", "fcprojw") else 0.02
        p[name].normal_(0.0, std, generator=g)
    p["wte"][V:] = 0.0                       # padded vocab rows start at zero
    for name in ["ln1w", "ln2w", "lnfw"]:
        p[name].fill_(1.0)
    if cfg["mode"] in ("shc", "dhc"):
        for k in range(K):
            p["hc_A"][k, k % n, 0] = 1.0                       # a = e_{k mod n}
            p["hc_A"][k, :, 1:] = torch.eye(n)                 # A_r = I
        p["hc_b"].fill_(1.0)
    if cfg["mode"] == "dhc":
        p["hc_lnw"].fill_(1.0)
        p["hc_sa"].fill_(0.01)
        p["hc_sb"].fill_(0.01)
    if cfg["mode"] == "mhc":
        for k in range(K):
            p["mhc_bias"][k, k % n] = 1.0                      # b_pre = e_{k mod n}
            p["mhc_bias"][k, 2 * n:] = torch.eye(n).reshape(-1)  # b_res = I, b_post = 0
        p["mhc_alpha"].fill_(0.01)
    return p


def flat_bytes(p, cfg):
    return b"".join(p[name].contiguous().numpy().astype("<f4").tobytes()
                    for name, _ in formats.param_specs(cfg))


# ----------------------------------------------------------------------------------------------
# model (SPEC.md sections 1-2)


def layernorm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(x, p, l, NH):
    B, T, C = x.shape
    hs = C // NH
    qkv = x @ p["qkvw"][l].T + p["qkvb"][l]
    q, k, v = qkv.split(C, dim=-1)
    q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ p["attprojw"][l].T + p["attprojb"][l]


def sublayer(k, u, p, cfg):
    """F_k: even k attention, odd k MLP, each with its own pre-LayerNorm."""
    l = k // 2
    if k % 2 == 0:
        return attention(layernorm(u, p["ln1w"][l], p["ln1b"][l]), p, l, cfg["NH"])
    h = layernorm(u, p["ln2w"][l], p["ln2b"][l]) @ p["fcw"][l].T + p["fcb"][l]
    return gelu_tanh(h) @ p["fcprojw"][l].T + p["fcprojb"][l]


def sinkhorn(X, iters):
    """SPEC 2.3: exp after subtracting the max, then iters x (columns, then rows)."""
    M = torch.exp(X - X.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        M = M / M.sum(dim=-2, keepdim=True)   # every column sums to 1
        M = M / M.sum(dim=-1, keepdim=True)   # every row sums to 1
    return M


def hc_coeffs(k, H, p, cfg):
    """(pre, post, res) of sublayer k for every token: u = sum_i pre_i H_i,
    H'_i = sum_j res[i,j] H_j + post_i y. Shapes (B,T,n), (B,T,n), (B,T,n,n)."""
    mode, n = cfg["mode"], cfg["n"]
    B, T = H.shape[:2]
    if mode in ("shc", "dhc"):
        A = p["hc_A"][k].expand(B, T, n, n + 1)
        b = p["hc_b"][k].expand(B, T, n)
        if mode == "dhc":
            N = layernorm(H, p["hc_lnw"][k], p["hc_lnb"][k])       # each stream alone
            A = A + p["hc_sa"][k] * torch.tanh(N @ p["hc_Wa"][k])  # row i from stream i
            b = b + p["hc_sb"][k] * torch.tanh(N @ p["hc_Wb"][k])
        # H'_j = b_j y + sum_i A[i,1+j] H_i: the width matrix enters transposed
        return A[..., 0], b, A[..., 1:].transpose(-1, -2)
    # mhc
    x = H.reshape(B, T, n * cfg["C"])
    r = torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    z = (x @ p["mhc_phi"][k]) / r
    bias, alpha = p["mhc_bias"][k], p["mhc_alpha"][k]
    pre = torch.sigmoid(alpha[0] * z[..., :n] + bias[:n])
    post = 2.0 * torch.sigmoid(alpha[1] * z[..., n:2 * n] + bias[n:2 * n])
    res_t = alpha[2] * z[..., 2 * n:].reshape(B, T, n, n) + bias[2 * n:].reshape(n, n)
    return pre, post, sinkhorn(res_t, cfg["sinkhorn_iters"])


def forward(p, cfg, idx, targets, keep=None, hscale=1.0, spread=None):
    """Logits (B,T,Vp) and mean loss. keep: list that receives each sublayer's coefficients;
    hscale multiplies the reduced state before LN_f (for the init-equivalence check); spread:
    list that receives max |H_i - H_0| over streams after every sublayer."""
    B, T = idx.shape
    n, V = cfg["n"], cfg["V"]
    x0 = p["wte"][idx] + p["wpe"][:T]
    H = x0.unsqueeze(2).expand(B, T, n, cfg["C"])            # H^0_i = x0 for every stream
    for k in range(2 * cfg["L"]):
        if cfg["mode"] == "residual":
            H = H + sublayer(k, H[:, :, 0], p, cfg).unsqueeze(2)
            if keep is not None:
                one = torch.ones(B, T, 1, dtype=DT)
                keep.append((one, one, one.unsqueeze(-1)))
            continue
        pre, post, res = hc_coeffs(k, H, p, cfg)
        if keep is not None:
            keep.append((pre, post, res))
        u = torch.einsum("bti,bticd->btcd", pre, H.unsqueeze(-1)).squeeze(-1)
        y = sublayer(k, u, p, cfg)
        H = torch.einsum("btij,btjc->btic", res, H) + post.unsqueeze(-1) * y.unsqueeze(2)
        if spread is not None:
            spread.append((H - H[:, :, :1]).abs().max().item())
    h = H.sum(2) * hscale                                      # reduce the streams
    logits = layernorm(h, p["lnfw"], p["lnfb"]) @ p["wte"].T
    loss = torch.nn.functional.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1))
    return logits, loss


# ----------------------------------------------------------------------------------------------
# AdamW (SPEC.md section 3, llm.c's update and clipping)

DECAY = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}


def adamw_steps(p64, cfg, idx, targets, steps, lr, b1, b2, eps, wd, clip):
    m = {k: torch.zeros_like(v) for k, v in p64.items()}
    v = {k: torch.zeros_like(x) for k, x in p64.items()}
    losses = []
    for t in range(1, steps + 1):
        for x in p64.values():
            x.grad = None
        _, loss = forward(p64, cfg, idx, targets)
        loss.backward()
        losses.append(loss.item())
        norm = math.sqrt(sum(float((x.grad ** 2).sum()) for x in p64.values()))
        scale = clip / norm if norm > clip else 1.0
        with torch.no_grad():
            for name, x in p64.items():
                g = x.grad * scale
                m[name].mul_(b1).add_((1 - b1) * g)
                v[name].mul_(b2).add_((1 - b2) * g * g)
                mh = m[name] / (1 - b1 ** t)
                vh = v[name] / (1 - b2 ** t)
                x.sub_(lr * (mh / (torch.sqrt(vh) + eps) + (wd * x if name in DECAY else 0.0)))
    return losses


# ----------------------------------------------------------------------------------------------
# dumps

BASE = dict(max_seq_len=64, V=500, Vp=formats.padded_vocab(500), L=3, NH=4, C=64, sinkhorn_iters=20)
CONFIGS = [("residual", "residual", 1), ("shc4", "shc", 4), ("dhc4", "dhc", 4),
           ("mhc4", "mhc", 4), ("mhc2", "mhc", 2)]
B, T, STEPS, SEED, DATA_SEED = 4, 32, 10, 1337, 42
HYPER = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0)
WARM_STEPS, WARM_LR = 3, 1e-2


def to64(p):
    return {k: v.to(DT).clone().requires_grad_(True) for k, v in p.items()}


def run_config(name, mode, n, idx, targets, warm, outdir):
    cfg = dict(BASE, mode=mode, n=n)
    formats.check_config(cfg)
    p32 = init_params(cfg, SEED)
    keep, spread = [], []
    with torch.no_grad():
        _, loss = forward(to64(p32), cfg, idx, targets, keep, spread=spread)
    # the dumped model: WARM_STEPS AdamW steps from the init on the warm-up batch, rounded to fp32
    pw = to64(p32)
    adamw_steps(pw, cfg, warm[0], warm[1], WARM_STEPS, **dict(HYPER, lr=WARM_LR))
    d32 = {k: v.detach().to(torch.float32) for k, v in pw.items()}
    p64 = to64(d32)
    dkeep = []
    logits, dloss = forward(p64, cfg, idx, targets, dkeep)
    dloss.backward()
    grads = b"".join(p64[nm].grad.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
                     for nm, _ in formats.param_specs(cfg))
    coeffs = torch.cat([torch.cat([pre, post, res.flatten(-2)], -1) for pre, post, res in dkeep])
    losses = adamw_steps(to64(d32), cfg, idx, targets, STEPS, **HYPER)
    assert abs(losses[0] - dloss.item()) < 1e-12
    checks = []
    if mode != "residual":   # after the warm-up no HC/mHC gradient is 0
        low = min(float(p64[nm].grad.abs().max()) for nm, _ in formats.param_specs(cfg)
                  if nm.startswith(("hc_", "mhc_")))
        checks.append(("smallest HC/mHC gradient max |g| (must be > 0)", 0.0 if low > 0 else 1.0, 0.5))
    if mode != "residual":   # at init every stream holds the same vector
        checks.append(("max |H_i - H_0| after any sublayer", max(spread), 1e-12))
    if mode in ("shc", "dhc"):   # ... so HC equals residual with the final state scaled by n
        rcfg = dict(cfg, mode="residual", n=1)
        rp = {k: v for k, v in to64(p32).items() if not k.startswith("hc_")}
        _, rloss = forward(rp, rcfg, idx, targets, hscale=float(n))
        checks.append(("init loss - residual(h*n) init loss", abs(loss.item() - rloss.item()), 1e-10))
    if mode == "mhc":   # every Hres: rows sum to 1 (1e-6), columns to about 1 (1e-3)
        for _, _, res in keep:
            checks.append(("Hres row sums", (res.sum(-1) - 1).abs().max().item(), 1e-6))
            checks.append(("Hres column sums", (res.sum(-2) - 1).abs().max().item(), 1e-3))
    if outdir:
        formats.write_model(os.path.join(outdir, f"{name}_model.bin"), cfg, flat_bytes(d32, cfg))
        P = formats.num_params(cfg)
        hdr = [0] * 256
        hdr[0:10] = [formats.DEBUG_MAGIC, formats.DEBUG_VERSION, B, T, STEPS, P & 0xFFFFFFFF, P >> 32,
                     cfg["Vp"], cfg["n"], 2 * cfg["L"]]
        hyper = [HYPER[k] for k in ("lr", "b1", "b2", "eps", "wd", "clip")] + [0.0, 0.0]
        blob = (struct.pack("<256i", *hdr) + struct.pack("<8d", *hyper)
                + idx.to(torch.int32).numpy().astype("<i4").tobytes()
                + targets.to(torch.int32).numpy().astype("<i4").tobytes()
                + struct.pack(f"<{STEPS}d", *losses)
                + logits.detach().to(torch.float32).numpy().astype("<f4").tobytes()
                + grads
                + coeffs.detach().to(torch.float32).numpy().astype("<f4").tobytes())
        path = os.path.join(outdir, f"{name}_debug.bin")
        with open(path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(path + ".tmp", path)
    return cfg, p32, loss.item(), losses, checks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(repo, "data", "ref"), help="output folder")
    ap.add_argument("--check", action="store_true", help="run the self-checks, write nothing")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    outdir = None if args.check else args.out
    if outdir:
        os.makedirs(outdir, exist_ok=True)
    g = torch.Generator().manual_seed(DATA_SEED)
    idx = torch.randint(0, BASE["V"], (B, T), generator=g)
    targets = torch.randint(0, BASE["V"], (B, T), generator=g)
    warm = (torch.randint(0, BASE["V"], (B, T), generator=g), torch.randint(0, BASE["V"], (B, T), generator=g))
    failed = 0
    base_loss = None
    base_p = None
    for name, mode, n in CONFIGS:
        cfg, p32, loss, losses, checks = run_config(name, mode, n, idx, targets, warm, outdir)
        if mode == "residual":
            base_loss, base_p = loss, p32
        # identical base weights in every mode (one RNG stream)
        same = all(torch.equal(p32[k], base_p[k]) for k in base_p)
        checks.append(("base weights identical to residual's", 0.0 if same else 1.0, 0.5))
        # at init the loss is the residual loss up to LayerNorm eps, which acts on states scaled
        # by n (shc/dhc, exact check above) or by sum(Hpre) (mhc): small at C=64 but not 1e-10
        checks.append(("init loss - residual init loss", abs(loss - base_loss),
                       1e-4 if mode == "mhc" else 2e-4))
        ok = all(v <= tol for _, v, tol in checks)
        failed += not ok
        worst = max((v for _, v, _ in checks), default=0.0)
        print(f"{name:9s} params {formats.num_params(cfg):8d}  loss {loss:.6f}  "
              f"10-step losses {losses[0]:.4f} -> {losses[-1]:.4f}  checks "
              f"{'ok' if ok else 'FAILED'} (worst {worst:.2e})")
        for what, v, tol in checks:
            if v > tol:
                print(f"  FAILED: {what}: {v:.3e} > {tol:.0e}")
    if outdir:
        print(f"wrote {len(CONFIGS)} model + debug dumps to {outdir}")
    print(f"reference self-checks: {len(CONFIGS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    try:
        main()
    except (OSError, formats.FormatError) as e:   # unwritable output, full disk, ...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
