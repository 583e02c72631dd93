"""Three offline text domains with fixed train / dev / test splits, written as jsonl files.

    python -m moedist.study domains OUT_DIR [--max-train-bytes N] [--domains code,prose,man]

Domains (one document = one file, topic or page):

* ``code``  -- the Python standard library's ``.py`` files (top level and packages, tests excluded);
* ``prose`` -- every topic of ``pydoc_data.topics`` (English prose about Python), cut at blank lines into
  documents of about 4 KB (``topic#k``): whole topics are few (about 80) and unequal, so a split by topic
  left the test split with 2% of the bytes; by piece each split gets close to its share;
* ``man``   -- the English section-1 man pages in /usr/share/man/man1, rendered to plain text by
  ``man -l`` (groff, 80 columns, backspace overstrikes removed). Rendered text rather than stripped
  roff: a model should see what a reader sees, not macro names. The page set depends on what is
  installed, so OUT_DIR/manifest.json records every document and each file's SHA-256; .ci/system-deps
  installs man-db (``man``) and groff-base where they are missing.

Split: a document goes to ``test`` when sha256(domain/doc) % 10 == 0, ``dev`` when it is 1, else
``train`` -- a function of its name only, so a document's split is the same on every machine and no
test or dev text is ever in a training file. Documents are taken in order of that hash until the
split's byte cap (train: --max-train-bytes, dev and test: a tenth of it each).

Files: OUT_DIR/{domain}.{train,dev,test}.jsonl, one {"text", "doc"} object per line (data.sources
format ``jsonl``), and OUT_DIR/manifest.json. Existing files with the same manifest are kept.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

DOMAINS = ("code", "prose", "man")
SPLITS = ("train", "dev", "test")
VERSION = 2                      # bump when the text a domain produces changes
MAX_DOC_BYTES = 60_000           # a longer document is cut (one huge file must not fill a split)
MAN_DIR = "/usr/share/man/man1"

Doc = Tuple[str, Callable[[], str]]   # (name, lazy text)


def split_of(domain: str, doc: str) -> str:
    """'test' | 'dev' | 'train' for a document, from sha256(domain/doc) only."""
    h = int.from_bytes(hashlib.sha256(f"{domain}/{doc}".encode()).digest()[:8], "little") % 10
    return "test" if h == 0 else "dev" if h == 1 else "train"


def _order_key(domain: str, doc: str) -> bytes:
    return hashlib.sha256(f"order/{domain}/{doc}".encode()).digest()


def _read(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def code_docs() -> List[Doc]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idle_test", "site-packages",
                                                             "__pycache__") and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".py"):
                p = os.path.join(dirpath, f)
                out.append((os.path.relpath(p, root), lambda p=p: _read(p)))
    return out


PROSE_PIECE = 4096              # characters per prose document (a topic is cut at blank lines)


def pieces(text: str, size: int = PROSE_PIECE) -> List[str]:
    """`text` cut at blank lines into pieces of at most about `size` characters (a longer paragraph stays whole)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return out + ([cur] if cur else [])


def prose_docs() -> List[Doc]:
    from pydoc_data.topics import topics

    return [(f"{k}#{i}", lambda t=t: t) for k in sorted(topics) for i, t in enumerate(pieces(topics[k]))]


def render_man(path: str) -> str:
    """A man page as plain text (80 columns, no overstrikes); '' when it does not render."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    try:
        r = subprocess.run(["man", "-l", "-P", "cat", path], capture_output=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    text = r.stdout.decode("utf-8", errors="replace")
    out, i = [], 0
    while i < len(text):        # col -b: "X\bX" (bold) and "_\bX" (underline) -> X
        if i + 1 < len(text) and text[i + 1] == "\b":
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out) if r.returncode == 0 else ""


def man_docs() -> List[Doc]:
    if shutil.which("man") is None:
        raise SystemExit("moedist.study.domains: the man domain needs `man` (apt-get install man-db groff-base; "
                         "bash .ci/system-deps installs them)")
    if not os.path.isdir(MAN_DIR) or not os.listdir(MAN_DIR):
        raise SystemExit(f"moedist.study.domains: no man pages in {MAN_DIR} (a minimized image strips them; "
                         "run `unminimize` or install packages with their man pages)")
    names = sorted(f for f in os.listdir(MAN_DIR) if not f.startswith("."))
    return [(n, lambda n=n: render_man(os.path.join(MAN_DIR, n))) for n in names]


SOURCES: Dict[str, Callable[[], List[Doc]]] = {"code": code_docs, "prose": prose_docs, "man": man_docs}


def select(domain: str, docs: Sequence[Doc], max_train_bytes: int) -> Iterator[Tuple[str, str, str]]:
    """(split, doc name, text) of the documents kept: hash order, each split up to its byte cap."""
    caps = {"train": max_train_bytes, "dev": max_train_bytes // 10, "test": max_train_bytes // 10}
    used = dict.fromkeys(SPLITS, 0)
    for name, text_of in sorted(docs, key=lambda d: _order_key(domain, d[0])):
        split = split_of(domain, name)
        if used[split] >= caps[split]:
            if all(used[s] >= caps[s] for s in SPLITS):
                return
            continue
        text = text_of()[:MAX_DOC_BYTES]
        if not text.strip():
            continue
        used[split] += len(text.encode("utf-8"))
        yield split, name, text


def write_domain(out: Path, domain: str, max_train_bytes: int) -> Dict[str, object]:
    """Write OUT/{domain}.{split}.jsonl; returns its manifest entry (docs and sha256 per split)."""
    tmp = {s: out / f".{domain}.{s}.jsonl.tmp" for s in SPLITS}
    fhs = {s: open(tmp[s], "w", encoding="utf-8") for s in SPLITS}
    docs: Dict[str, List[str]] = {s: [] for s in SPLITS}
    try:
        for split, name, text in select(domain, SOURCES[domain](), max_train_bytes):
            fhs[split].write(json.dumps({"text": text, "doc": name}, ensure_ascii=False) + "\n")
            docs[split].append(name)
    finally:
        for fh in fhs.values():
            fh.close()
    entry: Dict[str, object] = {}
    for s in SPLITS:
        if not docs[s]:
            raise SystemExit(f"moedist.study.domains: domain {domain!r} has no {s} documents")
        final = out / f"{domain}.{s}.jsonl"
        os.replace(tmp[s], final)
        entry[s] = {"docs": docs[s], "bytes": final.stat().st_size,
                    "sha256": hashlib.sha256(final.read_bytes()).hexdigest()}
    return entry


def build(out: Path, domains: Sequence[str], max_train_bytes: int) -> Dict[str, object]:
    """Write every domain's splits and OUT/manifest.json (kept as is when it already matches)."""
    out.mkdir(parents=True, exist_ok=True)
    want = {"version": VERSION, "max_train_bytes": max_train_bytes, "python": sys.version.split()[0]}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if {k: old.get(k) for k in want} == want and all(
                d in old.get("domains", {}) and all((out / f"{d}.{s}.jsonl").exists() for s in SPLITS)
                for d in domains):
            return old
    manifest = dict(want, domains={d: write_domain(out, d, max_train_bytes) for d in domains})
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moedist.study domains", description=__doc__.split("\n")[0])
    ap.add_argument("out", metavar="OUT_DIR")
    ap.add_argument("--max-train-bytes", type=int, default=1_500_000, help="train bytes per domain (dev, test: 1/10)")
    ap.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of code,prose,man")
    a = ap.parse_args(argv)
    domains = [d for d in a.domains.split(",") if d]
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains or a.max_train_bytes < 10_000:
        print(f"moedist.study.domains: --domains {a.domains!r} / --max-train-bytes {a.max_train_bytes}: "
              f"domains must be among {','.join(DOMAINS)}, bytes >= 10000", file=sys.stderr)
        return 2
    m = build(Path(a.out), domains, a.max_train_bytes)
    for d in domains:
        e = m["domains"][d]
        print(d, " ".join(f"{s}={len(e[s]['docs'])} docs/{e[s]['bytes']} B" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
