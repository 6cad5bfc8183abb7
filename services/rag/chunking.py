"""Documents into chunks: paragraphs packed up to a size, with overlap, under their headings.

A chunk holds whole paragraphs where they fit (a longer one is cut at line, then word ends), at
most ``size`` characters, and starts with up to ``overlap`` characters of the chunk before it in
the same section. Markdown headings start sections; each chunk of a section is prefixed with its
heading path (``Guide > Install``), which is most of what a short question matches on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: its text (heading path included) and its place."""

    source: str
    index: int
    text: str
    doc_hash: str
    """The whole document's content hash (sha256 of its text): unchanged documents are skipped."""


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sections(text: str) -> list[tuple[str, list[str]]]:
    """``(heading path, paragraphs)`` per Markdown section (plain text is one section)."""
    out: list[tuple[str, list[str]]] = []
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []
    fenced = False

    def end_paragraph() -> None:
        if current:
            paragraphs.append("\n".join(current).strip())
            current.clear()

    def end_section() -> None:
        end_paragraph()
        if any(paragraphs):
            out.append((" > ".join(t for _, t in path), [p for p in paragraphs if p]))
        paragraphs.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            end_section()
            level = len(heading[1])
            path[:] = [(lv, t) for lv, t in path if lv < level] + [(level, heading[2])]
        elif not line.strip() and not fenced:
            end_paragraph()
        else:
            current.append(line)
    end_section()
    return out


def _pieces(paragraph: str, size: int) -> list[str]:
    """A paragraph cut to at most ``size`` characters, at line then word ends where possible."""
    if len(paragraph) <= size:
        return [paragraph]
    out: list[str] = []
    rest = paragraph
    while len(rest) > size:
        cut = rest.rfind("\n", 0, size)
        if cut < size // 2:
            cut = rest.rfind(" ", 0, size)
        if cut < size // 2:
            cut = size
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        out.append(rest)
    return out


def chunk(source: str, text: str, size: int = 1000, overlap: int = 200) -> list[Chunk]:
    """The chunks of one document (``source`` names it: a path or an id)."""
    if overlap >= size:
        raise ValueError(f"overlap ({overlap}) must be smaller than the chunk size ({size})")
    doc_hash = content_hash(text)
    texts: list[str] = []
    for heading, paragraphs in sections(text):
        prefix = f"{heading}\n\n" if heading else ""
        room = max(size - len(prefix), size // 2)
        body: list[str] = []
        length = 0
        for piece in (p for para in paragraphs for p in _pieces(para, room)):
            if body and length + len(piece) + 2 > room:
                texts.append(prefix + "\n\n".join(body))
                # keep the tail paragraphs that fit in the overlap
                kept: list[str] = []
                kept_len = 0
                for prev in reversed(body):
                    if kept_len + len(prev) + 2 > overlap:
                        break
                    kept.insert(0, prev)
                    kept_len += len(prev) + 2
                body, length = kept, kept_len
            body.append(piece)
            length += len(piece) + 2
        if body:
            texts.append(prefix + "\n\n".join(body))
    return [Chunk(source, i, t, doc_hash) for i, t in enumerate(texts)]
