"""A signed report as a one- or two-page PDF (reportlab), for clinics that keep paper records.

Header (title, report id and version, modality), the image thumbnail with its window (the
:class:`~edge.media.images.LoadedImage` the model saw, already windowed), findings, impression,
recommendation, the signer with role and time, the disclaimer and the provenance. Text is set in
DejaVu Sans when the system has it (wide Unicode coverage), else reportlab's bundled Bitstream
Vera; both are embedded. The PDF is built with reportlab's ``invariant`` mode: the same report
and image give the same bytes.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from edge.errors import require
from edge.reports.content import DISCLAIMER, finding_text
from edge.reports.sr import require_signed

log = logging.getLogger(__name__)

THUMBNAIL_PX = 768  # longest side of the embedded image, in pixels
_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/system/fonts"))
_fonts: tuple[str, str] | None = None


def _register_fonts() -> tuple[str, str]:
    """(regular, bold) font names: DejaVu Sans where installed, else the bundled Vera."""
    global _fonts
    if _fonts is not None:
        return _fonts
    from reportlab import rl_config
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    for d in _FONT_DIRS:
        regular, bold = d / "DejaVuSans.ttf", d / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            pdfmetrics.registerFont(TTFont("MGE-Sans", str(regular)))
            pdfmetrics.registerFont(TTFont("MGE-Sans-Bold", str(bold)))
            break
    else:
        base = Path(rl_config.__file__).parent / "fonts"
        pdfmetrics.registerFont(TTFont("MGE-Sans", str(base / "Vera.ttf")))
        pdfmetrics.registerFont(TTFont("MGE-Sans-Bold", str(base / "VeraBd.ttf")))
    _fonts = ("MGE-Sans", "MGE-Sans-Bold")
    return _fonts


def _window_caption(image: Any) -> str:
    info = getattr(image, "info", {}) or {}
    parts = [str(info["modality"])] if info.get("modality") else []
    w = info.get("window") or {}
    if "center" in w and "width" in w:
        parts.append(f"window C {w['center']:g} / W {w['width']:g} ({w.get('from', 'file')})")
    elif w.get("from"):
        parts.append(f"window: {w['from']}")
    if info.get("frames", 1) and int(info.get("frames", 1)) > 1:
        parts.append(f"frame {int(info.get('frame', 0)) + 1} of {info['frames']}")
    parts.append(f"{image.source_size[0]}x{image.source_size[1]} px")
    return ", ".join(parts)


def build_pdf(report: dict, image: Any = None, *, institution: str | None = None) -> bytes:
    """The PDF of a signed report.

    Args:
        report: a signed REPORT.
        image: the source image as an ``edge.media.images.LoadedImage`` (already windowed), or
            None (no thumbnail; the source is named by its UIDs or hash).
        institution: a clinic name for the header, when configured.
    Raises:
        ConflictError: the report is not signed.
    """
    require_signed(report)
    require("reportlab", "reports")
    from xml.sax.saxutils import escape

    from reportlab.lib import colors
    from reportlab.lib.enums import TA_LEFT
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    regular, bold = _register_fonts()
    body = ParagraphStyle("body", fontName=regular, fontSize=10, leading=13, alignment=TA_LEFT)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.HexColor("#444444"))
    head = ParagraphStyle("head", parent=body, fontName=bold, fontSize=12, leading=15, spaceBefore=6)
    title = ParagraphStyle("title", parent=body, fontName=bold, fontSize=16, leading=20)

    final, prov, source, signer = report["final"], report["provenance"], report["source"], report["signer"]

    def p(text: str, style=body) -> Paragraph:
        return Paragraph(escape(text).replace("\n", "<br/>"), style)

    story: list = [p(institution or "Imaging report", title)]
    story.append(p(f"Report {report['report_id']}, version {report['version']}"
                   + (f" (amends version {report['replaces']})" if report.get("replaces") else "")
                   + f" | {final['modality']}", small))  # fmt: skip
    if source.get("study_uid"):
        src = f"Study {source['study_uid']}" + (
            f", instance {source['instance_uid']}" if source.get("instance_uid") else ""
        )
    else:
        src = f"Uploaded image, sha256 {source['image_sha256']}"
    story += [p(src, small), Spacer(1, 4 * mm)]

    if image is not None:
        thumb = image.image.copy()
        thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        buf.seek(0)
        w, h = thumb.size
        scale = min(80 * mm / w, 80 * mm / h)
        story += [
            Image(buf, width=w * scale, height=h * scale, hAlign="LEFT"),
            p(_window_caption(image), small),
        ]

    story.append(p("Findings", head))
    if final["findings"]:
        rows = [[p("•"), p(finding_text(f))] for f in final["findings"]]
        table = Table(rows, colWidths=[6 * mm, None])
        table.setStyle(
            TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)])
        )
        story.append(table)
    else:
        story.append(p("No findings recorded."))
    story += [p("Impression", head), p(final["impression"])]
    if final.get("recommendation"):
        story += [p("Recommendation", head), p(final["recommendation"])]
    story += [p("Signed", head), p(f"{signer['name']}, {signer['role']}, at {report['signed_at']}")]
    story += [Spacer(1, 6 * mm), p(DISCLAIMER, head)]
    story.append(p("Provenance: " + "; ".join(f"{k}={v}" for k, v in prov.items()), small))
    if report.get("sr_sop_instance_uid"):
        story.append(p(f"DICOM SR SOP Instance UID {report['sr_sop_instance_uid']}", small))

    out = io.BytesIO()
    doc = SimpleDocTemplate(
        out, pagesize=A4, invariant=1, title=f"Report {report['report_id']} v{report['version']}",
        author=signer["name"], subject="AI-drafted, clinician-signed imaging report", creator="medgemma-edge",
        leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm, bottomMargin=16 * mm,
    )  # fmt: skip
    doc.build(story)
    data = out.getvalue()
    log.info("report %s v%d: PDF %d bytes", report["report_id"], report["version"], len(data))
    return data
