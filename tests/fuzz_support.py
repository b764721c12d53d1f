"""Malformed DICOM for the fuzz tests (no tests here): hypothesis strategies that damage real files'
data sets while keeping their file meta intact, so a presentation context can still be negotiated and
pynetdicom's `send_c_store(path)` sends the damaged bytes exactly as they are.

The damage the issue lists: truncations, wrong VRs, huge or odd lengths, bad transfer syntaxes (a meta
that claims another syntax than the data set's), pixel data size mismatch, broken sequences, absurd
dimensions, deep nesting; plus random byte flips and insertions.

Figures: with EDGESCREEN_FUZZ_RESULTS=1 (`make fuzz`) each target's counts are merged into the `fuzz`
section of bench/results.json. EDGESCREEN_FUZZ_EXAMPLES sets the cases per target (small fixed samples
under `make test`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80")
# Rows, Columns, Bits Allocated, Samples per Pixel, Number of Frames: the dimensions the checks read
DIMENSION_TAGS = (0x00280010, 0x00280011, 0x00280100, 0x00280002, 0x00280008)


def examples(default: int) -> int:
    """Cases per target: EDGESCREEN_FUZZ_EXAMPLES (make fuzz) or the small fixed sample of make test."""
    return int(os.environ.get("EDGESCREEN_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int) -> settings:
    """Reproducible small samples under make test (derandomized); fresh random cases under make fuzz."""
    n = examples(default)
    return settings(max_examples=n, deadline=None, database=None, derandomize="EDGESCREEN_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes
    header_at: int  # offset of the element header in the data set
    length_at: int  # offset of its length field
    length_size: int  # 2 or 4
    value_at: int
    length: int


def elements(data: bytes) -> list[Element]:
    """Top-level elements of an explicit VR little endian data set (what pydicom writes for the bases)."""
    out: list[Element] = []
    pos = 0
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            out.append(Element(group << 16 | elem, vr, pos, pos + 8, 4, pos + 12, length))
            if length == 0xFFFFFFFF:
                break  # an undefined-length sequence: the top-level walk stops here (enough to mutate)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            out.append(Element(group << 16 | elem, vr, pos, pos + 6, 2, pos + 8, length))
            pos += 8 + length
    return out


def split(file_bytes: bytes) -> tuple[bytes, bytes]:
    """(preamble + DICM + file meta, data set) of a Part 10 file."""
    end = 144 + struct.unpack_from("<L", file_bytes, 140)[0]
    return file_bytes[:end], file_bytes[end:]


def with_syntax(meta: bytes, syntax: str) -> bytes:
    """The same file meta claiming another transfer syntax (group length fixed up)."""
    body = meta[144:]
    out, pos = b"", 0
    while pos < len(body):
        group, elem = struct.unpack_from("<HH", body, pos)
        vr = body[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", body, pos + 8)
            end = pos + 12 + length
        else:
            (length,) = struct.unpack_from("<H", body, pos + 6)
            end = pos + 8 + length
        if (group, elem) == (0x0002, 0x0010):
            value = syntax.encode() + (b"\0" if len(syntax) % 2 else b"")
            out += body[pos:pos + 6] + struct.pack("<H", len(value)) + value
        else:
            out += body[pos:end]
        pos = end
    return meta[:140] + struct.pack("<L", len(out)) + out


def _nested(depth: int, undefined: bool) -> bytes:
    """A private sequence nested `depth` deep (each level one item holding the next sequence)."""
    inner = b""
    for _ in range(depth):
        if undefined:
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
            inner = b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        else:
            item = b"\xfe\xff\x00\xe0" + struct.pack("<L", len(inner)) + inner
            inner = b"\x09\x00\x10\x10SQ\x00\x00" + struct.pack("<L", len(item)) + item
    return inner


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> tuple[str, object]:
    """One kind of damage and its parameters, drawn for the data set `data`."""
    els = elements(data)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "wrong_vr", "length", "syntax", "dimension",
                                 "pixel_length", "broken_sequence", "deep_nesting", "garbage"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "flip":
        return kind, draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1,
                                   max_size=16))
    if kind == "insert":
        return kind, (draw(st.integers(0, len(data))), draw(st.binary(min_size=1, max_size=64)))
    if kind in ("wrong_vr", "length"):
        el = draw(st.sampled_from(els))
        if kind == "wrong_vr":
            return kind, (el.header_at, draw(st.sampled_from([b"SQ", b"UN", b"OB", b"XX", b"\0\0", b"ox", b"UT"])))
        huge = [0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, el.length + 1, el.length * 2 + 3, 1, 0]
        value = draw(st.sampled_from(huge) | st.integers(0, 2**32 - 1))
        return kind, (el.length_at, el.length_size, value)
    if kind == "syntax":
        return kind, draw(st.sampled_from(SYNTAXES))
    if kind == "dimension":
        targets = [el for el in els if el.tag in DIMENSION_TAGS] or els
        el = draw(st.sampled_from(targets))
        return kind, (el, draw(st.sampled_from([0, 1, 3, 7, 12, 0x7FFF, 0x8000, 0xFFFF]) | st.integers(0, 0xFFFF)))
    if kind == "pixel_length":
        return kind, draw(st.integers(-4096, 4096).filter(lambda d: d != 0))
    if kind == "broken_sequence":
        return kind, draw(st.sampled_from(["no_item_end", "no_seq_end", "bad_item_tag", "item_too_long"]))
    if kind == "deep_nesting":
        return kind, (draw(st.sampled_from([50, 400, 990, 1100, 3000])), draw(st.booleans()))
    return kind, draw(st.binary(min_size=0, max_size=4096))


def apply(meta: bytes, data: bytes, mutations: list[tuple[str, object]]) -> bytes:
    """The damaged file: `meta` (maybe claiming another syntax) + the data set with each mutation applied."""
    buf = bytearray(data)
    for kind, arg in mutations:
        if kind == "truncate":
            del buf[int(arg):]  # type: ignore[call-overload]
        elif kind == "flip":
            for pos, value in arg:  # type: ignore[union-attr]
                if pos < len(buf):
                    buf[pos] = value
        elif kind == "insert":
            pos, blob = arg  # type: ignore[misc]
            buf[pos:pos] = blob
        elif kind == "wrong_vr":
            at, vr = arg  # type: ignore[misc]
            buf[at + 4:at + 6] = vr
        elif kind == "length":
            at, size, value = arg  # type: ignore[misc]
            buf[at:at + size] = struct.pack("<L" if size == 4 else "<H", value & (0xFFFFFFFF if size == 4 else 0xFFFF))
        elif kind == "syntax":
            meta = with_syntax(meta, str(arg))
        elif kind == "dimension":
            el, value = arg  # type: ignore[misc]
            if el.length == 2 and el.value_at + 2 <= len(buf):
                buf[el.value_at:el.value_at + 2] = struct.pack("<H", value)
            elif el.value_at + el.length <= len(buf):  # IS (Number of Frames): a decimal string
                text = str(value).encode()[:el.length].ljust(el.length)
                buf[el.value_at:el.value_at + el.length] = text
        elif kind == "pixel_length":
            pixels = [el for el in elements(bytes(buf)) if el.tag == 0x7FE00010]
            if pixels:
                el = pixels[0]
                new = max(0, el.length + int(arg))  # type: ignore[call-overload]
                buf[el.length_at:el.length_at + 4] = struct.pack("<L", new)
                del buf[el.value_at + min(new, el.length):]
                buf += b"\x5a" * max(0, new - el.length)
        elif kind == "broken_sequence":
            seq = _nested(3, undefined=True)
            if arg == "no_item_end":
                seq = seq.replace(b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"", 1)
            elif arg == "no_seq_end":
                seq = seq[:-8]
            elif arg == "bad_item_tag":
                seq = seq.replace(b"\xfe\xff\x00\xe0", b"\xfe\xff\x01\xe0", 1)
            else:
                seq = _nested(3, undefined=False)
                seq = seq[:16] + struct.pack("<L", 0x7FFFFFF0) + seq[20:]
            _insert_private(buf, seq)
        elif kind == "deep_nesting":
            depth, undefined = arg  # type: ignore[misc]
            _insert_private(buf, _nested(depth, undefined))
        else:
            buf[:] = arg  # type: ignore[index]
    return meta + bytes(buf)


def _insert_private(buf: bytearray, blob: bytes) -> None:
    """Put a (0009,xxxx) private element where it sorts: after group 0008, before group 0010."""
    at = next((el.header_at for el in elements(bytes(buf)) if el.tag > 0x00091010), len(buf))
    buf[at:at] = blob


@st.composite
def malformed_file(draw: st.DrawFn, bases: list[bytes]) -> tuple[bytes, list[str]]:
    """(damaged Part 10 file, the kinds of damage) from one of `bases`."""
    meta, data = split(draw(st.sampled_from(bases)))
    muts = draw(st.lists(mutation(data), min_size=1, max_size=3))
    return apply(meta, data, muts), [k for k, _ in muts]


# -- figures ------------------------------------------------------------------------------------------
def record(target: str, figures: dict) -> None:
    """Merge one target's counts into the `fuzz` section of bench/results.json (make fuzz only)."""
    if os.environ.get("EDGESCREEN_FUZZ_RESULTS") != "1":
        return
    from bench.results_io import RESULTS, machine, write_section

    current = json.loads(RESULTS.read_text()).get("fuzz", {}) if RESULTS.exists() else {}
    targets = {k: v for k, v in current.get("targets", {}).items() if k != target}
    targets[target] = figures
    totals = {key: sum(int(t.get(key, 0)) for t in targets.values()) for key in ("cases", "crashes", "quarantined",
                                                                                  "refused", "accepted")}
    write_section("fuzz", {**totals, "targets": targets}, command="make fuzz", machine_info=machine())


def base_files(tmp: Path) -> list[bytes]:
    """Small real files to damage: CT (64x64, 16-bit) and MG For Presentation, as pydicom writes them."""
    from pydicom.uid import generate_uid

    from tests.test_dicom_support import write_ct_series, write_mg_series

    ct = write_ct_series(tmp / "ct", 2, size=64)
    mg = write_mg_series(tmp / "mg", [("L", "CC"), ("R", "MLO")], study=generate_uid(), series_number=1, size=64)
    return [p.read_bytes() for p in ct + mg]
