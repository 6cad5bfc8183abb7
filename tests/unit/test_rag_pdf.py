"""PDF files for ``servery rag ingest`` (models/cli/rag.py): text per page under a ``# Page N``
heading, and a PDF without text (scanned), encrypted or broken refused with its reason. The PDFs
are written here: :func:`pdf_bytes` by hand (one Helvetica text line per page), a blank page by
pypdf."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from models.cli.rag import files_under, read_text
from services.rag.chunking import chunk


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal valid PDF: one page per string, each drawn as text (empty: a page without
    text, as a scanned page is to a text extractor)."""
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
    ]
    font = 3 + 2 * n
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode() if text else b""
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def test_a_pdf_is_read_page_by_page_and_chunks_name_their_page(tmp_path: Path) -> None:
    path = tmp_path / "manual.pdf"
    path.write_bytes(pdf_bytes(["The pump runs at 40 litres a minute.", "", "#3 Valve (check)"]))
    text = read_text(path)
    assert text.startswith("# Page 1\n\nThe pump runs at 40 litres a minute.")
    assert "# Page 2" not in text  # the page without text is left out, its number kept
    assert "# Page 3\n\n #3 Valve (check)" in text  # a line's own '#' is no heading
    chunks = chunk("manual.pdf", text, 1000, 200)
    assert [c.text.split("\n")[0] for c in chunks] == ["Page 1", "Page 3"]
    assert files_under([str(tmp_path)])[0] == [path]  # .pdf files are found in folders


def test_a_pdf_without_text_is_refused_with_its_reason(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.add_blank_page(612, 792)
    scanned = tmp_path / "scan.pdf"
    with scanned.open("wb") as f:
        writer.write(f)
    with pytest.raises(ValueError, match=r"no extractable text in its 2 page\(s\): a scanned PDF"):
        read_text(scanned)
    (tmp_path / "hand.pdf").write_bytes(pdf_bytes(["", ""]))
    with pytest.raises(ValueError, match="no extractable text"):
        read_text(tmp_path / "hand.pdf")


def test_an_encrypted_or_broken_pdf_is_refused_with_its_reason(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(["secret text"]))))
    writer.encrypt("password", algorithm="RC4-128")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as f:
        writer.write(f)
    with pytest.raises(ValueError, match="encrypted PDF"):
        read_text(locked)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not a PDF body at all\n")
    with pytest.raises(ValueError, match="not a readable PDF"):
        read_text(broken)
