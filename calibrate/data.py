"""Text documents for calibration and evaluation.

A *spec* names a document source:

- ``lee``: the Lee news corpus shipped in the gensim wheel (one document per line);
- ``enwiki``: a shortened English Wikipedia dump shipped in the gensim wheel, stripped
  to plain prose (one document per article of at least 200 words);
- ``path/to/file.txt``: documents separated by one or more blank lines;
- ``path/to/file.jsonl``: one JSON object per line with a string field ``text``;
- ``hf:NAME[:CONFIG]:SPLIT:FIELD``: a Hugging Face dataset (needs ``datasets`` and its hub).

The gensim wheel is fetched from PyPI through :mod:`clada.calibrate.cache`; a failed
download raises :class:`~clada.calibrate.cache.FetchError`, every bad spec
:class:`DataSpecError`.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import json
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import write_atomic
from .cache import extract_member
from .extras import require

GENSIM_WHEEL = "gensim==4.4.0"
TEST_DATA = "gensim/test/test_data/"
LEE_MEMBER = TEST_DATA + "lee_background.cor"
ENWIKI_MEMBER = TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BUILTIN_NAMES = ("lee", "enwiki")
_BUILTINS = ", ".join(BUILTIN_NAMES)

ENWIKI_MIN_WORDS = 200     # articles shorter than this (after cleaning) are dropped
PARAGRAPH_MIN_WORDS = 8    # shorter paragraphs (headings, captions, stubs) are dropped
ENWIKI_CACHE_VERSION = 1   # bump when the cleaning changes, to invalidate cached parses


@dataclass(frozen=True)
class DocumentSet:
    """Documents loaded from a spec, with a JSON-able identity for provenance records."""

    name: str
    identity: dict
    documents: list[str]


class DataSpecError(ValueError):
    """A data spec that cannot be loaded; the message is one line naming the spec or file."""


def required_modules(spec: str) -> list[str]:
    """The optional modules (clada.calibrate.extras) loading ``spec`` uses."""
    return ["datasets"] if spec.startswith("hf:") else []


def load_documents(spec: str) -> DocumentSet:
    """Load the documents named by ``spec`` (see the module docstring for the forms)."""
    if spec == "lee":
        source, raw = _read_member(LEE_MEMBER)
        docs = [line.strip() for line in _decode(raw, source).splitlines()]
    elif spec == "enwiki":
        source, raw = _read_member(ENWIKI_MEMBER)
        docs = _enwiki_documents(source, raw)
    elif spec.startswith("hf:"):
        docs = _hub_documents(spec)
        source, raw = spec, "\0".join(docs).encode("utf-8")
    elif spec.endswith((".txt", ".jsonl")):
        source = Path(spec).expanduser()
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise DataSpecError(f"data spec {spec!r}: cannot read file ({exc.strerror or exc}); "
                                f"built-in names: {_BUILTINS}") from None
        text = _decode(raw, source)
        docs = _jsonl_documents(text, source) if spec.endswith(".jsonl") else _txt_documents(text)
    else:
        raise DataSpecError(f"unknown data spec {spec!r}: expected one of {_BUILTINS}, "
                            "a .txt or .jsonl file, or hf:NAME[:CONFIG]:SPLIT:FIELD")
    docs = [doc for doc in docs if doc]
    if not docs:
        raise DataSpecError(f"data spec {spec!r}: no documents found in {source}; "
                            f"built-in names: {_BUILTINS}")
    identity = {"spec": spec, "source": str(source), "sha256": hashlib.sha256(raw).hexdigest(),
                "documents": len(docs)}
    return DocumentSet(name=spec, identity=identity, documents=docs)


def split_documents(docs: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``docs`` into ``(calibration, heldout)`` deterministically.

    The indices are shuffled with ``random.Random(seed)``; the last
    ``round(len(docs) * heldout_fraction)`` of them (clamped to 1 .. len-1) are held out.
    Both parts keep the documents' original order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = min(max(round(len(docs) * heldout_fraction), 1), len(docs) - 1)
    heldout = set(order[len(docs) - n_heldout:])
    return ([d for i, d in enumerate(docs) if i not in heldout],
            [d for i, d in enumerate(docs) if i in heldout])


# --- local files -------------------------------------------------------------------------

def _decode(raw: bytes, source: Path) -> str:
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise DataSpecError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _txt_documents(text: str) -> list[str]:
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text)]


def _jsonl_documents(text: str, source: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSpecError(f"{source}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataSpecError(f"{source}:{lineno}: expected an object with a string field 'text'")
        docs.append(record["text"].strip())
    return docs


# --- Hugging Face datasets ---------------------------------------------------------------

def _hub_documents(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise DataSpecError(f"data spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT:FIELD")
    name, config, split, field = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    require(required_modules(spec))
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types; report them all alike
        message = " ".join(str(exc).split())[:300]
        raise DataSpecError(f"data spec {spec!r}: {type(exc).__name__}: {message}") from None
    if field not in dataset.column_names:
        fields = ", ".join(dataset.column_names)
        raise DataSpecError(f"data spec {spec!r}: no field {field!r} (fields: {fields})")
    return [value.strip() for value in dataset[field] if isinstance(value, str) and value.strip()]


# --- gensim test data --------------------------------------------------------------------

def _read_member(member: str) -> tuple[Path, bytes]:
    path = extract_member(GENSIM_WHEEL, member)
    return path, path.read_bytes()


def _enwiki_documents(source: Path, raw: bytes) -> list[str]:
    """Articles of the bz2 dump as plain prose, cached as JSON next to ``source``."""
    sha256 = hashlib.sha256(raw).hexdigest()
    cache = source.with_name(source.name + ".documents.json")
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("version") == ENWIKI_CACHE_VERSION and cached.get("sha256") == sha256:
            return cached["documents"]
    except (OSError, ValueError, AttributeError):
        pass
    docs = []
    for text in _wiki_articles(bz2.decompress(raw)):
        doc = _prose(strip_wiki_markup(text))
        if len(doc.split()) >= ENWIKI_MIN_WORDS:
            docs.append(doc)
    _write_json_atomic(cache, {"version": ENWIKI_CACHE_VERSION, "sha256": sha256, "documents": docs})
    return docs


def _write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically; a failure only loses the cache."""
    try:
        write_atomic(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    except OSError:
        pass


def _wiki_articles(xml_bytes: bytes):
    """Yield the wikitext of each non-redirect main-namespace page of a MediaWiki XML dump."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in elem.iter()}
        ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        text = (fields["text"].text or "") if "text" in fields else ""
        if ns == "0" and "redirect" not in fields and not _REDIRECT.match(text):
            yield text
        elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_REDIRECT = re.compile(r"\s*#redirect", re.IGNORECASE)


# --- wiki markup -------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_DROPPED_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|syntaxhighlight|source|score|imagemap|nowiki|chem|hiero)\b[^>]*?"
    r"(?:/>|>.*?</\1\s*>)", re.DOTALL | re.IGNORECASE)
_BLOCK_TOKEN = re.compile(r"\{\{|\}\}|\{\||\|\}")
_TAIL_SECTION = re.compile(
    r"^=+\s*(?:see also|references|notes|footnotes|citations|sources|bibliography|further reading"
    r"|external links)\s*=+\s*$", re.MULTILINE | re.IGNORECASE)
_INNER_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_DROPPED_LINK = re.compile(r"\s*(?:(?i:file|image|media|category)|[a-z]{2,3}(?:-[a-z]+)*)\s*:")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_SUBSTITUTIONS = [
    (re.compile(r"<br\s*/?>", re.IGNORECASE), " "),
    (re.compile(r"</?[a-zA-Z][^<>]*>"), ""),                    # remaining tags, content kept
    (re.compile(r"https?://\S+"), ""),                           # bare URLs
    (re.compile(r"'{2,}"), ""),                                  # bold / italic
    (re.compile(r"__[A-Z]+__"), ""),                             # magic words (__TOC__)
    (re.compile(r"^=+\s*(.*?)\s*=+[ \t]*$", re.MULTILINE), r"\n\1\n"),  # headings -> own paragraph
    (re.compile(r"\{\{|\}\}|\{\||\|\}|\[\[|\]\]"), ""),          # unbalanced leftovers
    (re.compile(r"\(\s*(?:[,;:]\s*)*\)"), ""),                   # punctuation left by removed
    (re.compile(r"\(\s*(?:[,;:]\s*)+"), "("),                    # templates: "(; , x, )" -> "(x)"
    (re.compile(r"(?:\s*[,;:])+\s*\)"), ")"),
    (re.compile(r"[ \t\xa0]+([,.;:!?])"), r"\1"),
    (re.compile(r"[ \t\xa0]+"), " "),
]


def strip_wiki_markup(text: str) -> str:
    """Turn MediaWiki markup into plain text, keeping line and paragraph breaks.

    Comments, references and similar elements, templates, tables, file/category/interlanguage
    links and the sections from "See also"/"References"/... on are removed; internal and
    external links become their labels; headings become plain lines; other tags, bold/italic
    quotes and entities are resolved to text.
    """
    text = _DROPPED_ELEMENTS.sub("", _COMMENT.sub("", text))
    text = _remove_blocks(text)
    tail = _TAIL_SECTION.search(text)
    text = text[:tail.start()] if tail else text
    text = html.unescape(_EXTERNAL_LINK.sub(r"\1", _replace_links(text)))
    for pattern, replacement in _SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return "\n".join(line.strip() for line in text.split("\n"))


def _remove_blocks(text: str) -> str:
    """Remove templates ``{{...}}`` and tables ``{|...|}``, nested in any combination."""
    kept, stack, start, pos, opened = [], [], 0, 0, 0
    while True:
        match = _BLOCK_TOKEN.search(text, pos)
        if match is None:
            if not stack:
                break
            start, pos = opened, opened + 2   # unclosed block: keep its opener as text, rescan
            stack.clear()
            continue
        token, pos = match.group(), match.end()
        if token in ("{{", "{|"):
            if not stack:
                kept.append(text[start:match.start()])
                opened = match.start()
            stack.append(token)
        elif stack and stack[-1] == ("{{" if token == "}}" else "{|"):
            stack.pop()
            if not stack:
                start = pos
        elif token == "|}":
            pos = match.start() + 1   # the "|" of "|}}" inside a template: rescan from the "}"
    kept.append(text[start:])
    return "".join(kept)


def _replace_links(text: str) -> str:
    """Resolve ``[[...]]`` links from the innermost out (file captions may contain links)."""
    def replace(match: re.Match) -> str:
        target, label = match.group(1), match.group(2)
        if _DROPPED_LINK.match(target):
            return ""
        return label if label else target.lstrip(":")

    while True:
        text, count = _INNER_LINK.subn(replace, text)
        if not count:
            return text


def _prose(text: str) -> str:
    """Join the prose paragraphs of cleaned wikitext, dropping lists, table rows and stubs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line and line[0] not in "*#:;|!"]
        paragraph = " ".join(lines)
        if len(paragraph.split()) >= PARAGRAPH_MIN_WORDS:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)
