"""The PDF report a doctor reads or a clinic prints, written with fpdf2 and embedded Unicode fonts.

Why fpdf2: pure Python (installs on a Jetson or an ARM mini-PC without a compiler), maintained, embeds
TrueType subsets with a ToUnicode map (so the text is searchable and `pdftotext` reads it back), and
falls back glyph by glyph to other fonts, which is what a name in Chinese or Amharic beside Latin text
needs. ReportLab would do too but brings C extensions and far more than we use.

Every page carries the title and the research-use banner at the top and "RESEARCH USE ONLY - page n of
N" at the bottom.

Only the faces a report uses are registered: fpdf2 parses a TrueType file on each add_font (tens of ms
for a DejaVu face, most of a second for a CJK collection), and a parsed font cannot be shared between
documents (fpdf2 subsets it in place when writing). So: DejaVu regular and bold always; a fallback font
only when the text has characters of its script, and then once, in its regular face (the fallbacks
have no bold face; with exact_match=False fpdf2 uses the regular one for bold text too).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__
from edgescreen.appliance.pipeline.outputs import fonts
from edgescreen.appliance.pipeline.outputs.codes import RESEARCH_TAG
from edgescreen.appliance.pipeline.outputs.text import Block

_MARGIN = 15.0  # mm
_SIZE = 9.0
_LINE = 4.6  # mm per line of 9 pt text


def _all_text(title: str, blocks: list[Block], banner: str) -> str:
    parts = [title, banner]
    for style, content in blocks:
        if style == "kv":
            parts += [f"{k} {v}" for k, v in content]
        elif style == "table":
            header, rows = content
            parts += [*header, *(c for row in rows for c in row)]
        else:
            parts.append(str(content))
    return "\n".join(parts)


def render_pdf(title: str, blocks: list[Block], banner: str = RESEARCH_USE_BANNER,
               created: dt.datetime | None = None) -> bytes:
    """The report as PDF bytes. FontMissing (with the package to install) when a needed font is absent."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    main, bold = fonts.require(fonts.MAIN), fonts.require(fonts.MAIN_BOLD)
    fallbacks = fonts.needed_fallbacks(_all_text(title, blocks, banner))

    class _Report(FPDF):
        def header(self) -> None:
            self.set_font("DejaVu", "B", 13)
            self.cell(0, 7, title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            self.set_font("DejaVu", "B", 8)
            self.set_fill_color(225, 225, 225)
            self.multi_cell(0, 4, banner, border=0, fill=True, padding=1.5, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            self.ln(2)

        def footer(self) -> None:
            self.set_y(-11)
            self.set_font("DejaVu", "", 7)
            self.cell(0, 4, f"{RESEARCH_TAG} - page {self.page_no()} of {{nb}}", align="L")

    pdf = _Report(format="A4", unit="mm")
    pdf.set_margins(_MARGIN, _MARGIN, _MARGIN)
    pdf.set_auto_page_break(True, margin=16)
    pdf.set_title(title)
    pdf.set_creator(f"edgescreen {__version__}")
    pdf.set_producer(f"edgescreen {__version__} (fpdf2)")
    if created is not None:
        pdf.set_creation_date(created if created.tzinfo else created.replace(tzinfo=dt.UTC))
    pdf.add_font("DejaVu", "", str(main))
    pdf.add_font("DejaVu", "B", str(bold))
    for spec in fallbacks:
        path = fonts.require(spec)
        kwargs: dict[str, Any] = {"collection_font_number": spec.collection_index} if path.suffix == ".ttc" else {}
        pdf.add_font(spec.family, "", str(path), **kwargs)  # stands in for bold too (exact_match=False)
    if fallbacks:
        pdf.set_fallback_fonts([s.family for s in fallbacks], exact_match=False)
    pdf.add_page()
    width = pdf.w - 2 * _MARGIN
    for style, content in blocks:
        if style == "h":
            pdf.ln(1.5)
            pdf.set_font("DejaVu", "B", 11)
            pdf.multi_cell(width, 6, str(content), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        elif style in ("t", "b"):
            pdf.set_font("DejaVu", "B" if style == "b" else "", _SIZE)
            pdf.multi_cell(width, _LINE, str(content), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        elif style == "kv":
            for label, value in content:
                pdf.set_font("DejaVu", "B", _SIZE)
                pdf.cell(38, _LINE, f"{label}:")
                pdf.set_font("DejaVu", "", _SIZE)
                pdf.multi_cell(width - 38, _LINE, str(value), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        elif style == "table":
            header, rows = content
            pdf.set_font("DejaVu", "", 8)
            # columns as wide as their longest entry (within bounds), so short columns do not waste a line
            widths = [min(max(len(str(v)) for v in column), 40) + 2 for column in zip(header, *rows, strict=True)]
            with pdf.table(width=width, col_widths=widths, line_height=4.2, text_align="LEFT",
                           first_row_as_headings=True, headings_style=_headings()) as table:
                for row in [header, *rows]:
                    cells = table.row()
                    for value in row:
                        cells.cell(str(value))
            pdf.ln(1)
        else:
            raise ValueError(f"unknown report block style {style!r}")
    return bytes(pdf.output())


def _headings() -> Any:
    from fpdf.fonts import FontFace

    return FontFace(family="DejaVu", emphasis="BOLD", fill_color=(235, 235, 235))
