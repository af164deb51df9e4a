"""
Readers and writers for the project's binary files, as defined in docs/FORMATS.md (the one
definition; llmc/gpt_hc_formats.h is the C side). Standard library only.
"""
import os
import struct

MODEL_MAGIC, MODEL_VERSION = 20261101, 1
STATE_MAGIC, STATE_VERSION = 20261102, 1
DEBUG_MAGIC, DEBUG_VERSION = 20261103, 1
MODES = ["residual", "shc", "dhc", "mhc"]


class FormatError(Exception):
    pass


def padded_vocab(V):
    return (V + 127) // 128 * 128


def param_specs(cfg):
    """[(name, shape)] of every parameter tensor in file order (docs/FORMATS.md)."""
    V, Vp, T, L, C = cfg["V"], cfg["Vp"], cfg["max_seq_len"], cfg["L"], cfg["C"]
    mode, n = cfg["mode"], cfg["n"]
    K = 2 * L
    specs = [("wte", (Vp, C)), ("wpe", (T, C)),
             ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
             ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
             ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)),
             ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]
    if mode in ("shc", "dhc"):
        specs += [("hc_A", (K, n, n + 1)), ("hc_b", (K, n))]
    if mode == "dhc":
        specs += [("hc_lnw", (K, C)), ("hc_lnb", (K, C)), ("hc_Wa", (K, C, n + 1)),
                  ("hc_Wb", (K, C)), ("hc_sa", (K,)), ("hc_sb", (K,))]
    if mode == "mhc":
        m = n * n + 2 * n
        specs += [("mhc_phi", (K, n * C, m)), ("mhc_bias", (K, m)), ("mhc_alpha", (K, 3))]
    return specs


def numel(shape):
    p = 1
    for s in shape:
        p *= s
    return p


def num_params(cfg):
    return sum(numel(s) for _, s in param_specs(cfg))


def check_config(cfg):
    """Raise FormatError with a reason if the config is impossible."""
    if cfg["mode"] not in MODES:
        raise FormatError(f"unknown mode {cfg['mode']!r}")
    for k in ("max_seq_len", "V", "L", "NH", "C", "n"):
        if not 1 <= cfg[k] <= 1 << 20:
            raise FormatError(f"config field {k}={cfg[k]} out of range")
    if cfg["Vp"] != padded_vocab(cfg["V"]):
        raise FormatError(f"padded vocab {cfg['Vp']} != V={cfg['V']} rounded up to 128")
    if cfg["C"] % cfg["NH"]:
        raise FormatError(f"channels {cfg['C']} not divisible by heads {cfg['NH']}")
    if cfg["mode"] == "residual" and cfg["n"] != 1:
        raise FormatError("residual mode requires n = 1")
    if not 1 <= cfg["n"] <= 8:
        raise FormatError(f"expansion rate n={cfg['n']} out of range 1..8")
    if cfg["mode"] == "mhc" and not 1 <= cfg["sinkhorn_iters"] <= 1000:
        raise FormatError(f"sinkhorn iterations {cfg['sinkhorn_iters']} out of range 1..1000")


def model_header(cfg):
    h = [0] * 256
    h[0:12] = [MODEL_MAGIC, MODEL_VERSION, cfg["max_seq_len"], cfg["V"], cfg["L"], cfg["NH"],
               cfg["C"], cfg["Vp"], MODES.index(cfg["mode"]), cfg["n"], cfg["sinkhorn_iters"], 0]
    P = num_params(cfg)
    h[12], h[13] = P & 0xFFFFFFFF, P >> 32
    return struct.pack("<256I", *[x & 0xFFFFFFFF for x in h])


def write_model(path, cfg, flat_params):
    """flat_params: bytes of float32 values (little-endian) in file order."""
    check_config(cfg)
    if len(flat_params) != 4 * num_params(cfg):
        raise FormatError("parameter byte count does not match the config")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model_header(cfg))
        f.write(flat_params)
    os.replace(tmp, path)


def read_model(path):
    """(cfg, float32 bytes). Raises FormatError with a one-line reason on bad files."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror}")
    if len(data) < 1024:
        raise FormatError(f"{path}: truncated header ({len(data)} bytes)")
    h = struct.unpack_from("<256i", data)
    if h[0] != MODEL_MAGIC:
        raise FormatError(f"{path}: bad magic {h[0]} (not a gpt_hc model checkpoint)")
    if h[1] != MODEL_VERSION:
        raise FormatError(f"{path}: unsupported version {h[1]} (this reader knows {MODEL_VERSION})")
    if not 0 <= h[8] < len(MODES):
        raise FormatError(f"{path}: unknown residual mode id {h[8]}")
    cfg = dict(max_seq_len=h[2], V=h[3], L=h[4], NH=h[5], C=h[6], Vp=h[7], mode=MODES[h[8]],
               n=h[9], sinkhorn_iters=h[10])
    if h[11] != 0:
        raise FormatError(f"{path}: unsupported dtype {h[11]} (only fp32 = 0)")
    check_config(cfg)
    P = (h[12] & 0xFFFFFFFF) | (h[13] << 32)
    if P != num_params(cfg):
        raise FormatError(f"{path}: header says {P} parameters, config implies {num_params(cfg)}")
    if len(data) != 1024 + 4 * P:
        raise FormatError(f"{path}: size {len(data)} bytes, expected {1024 + 4 * P} (truncated?)")
    return cfg, data[1024:]
