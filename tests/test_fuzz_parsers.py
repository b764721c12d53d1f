"""Hypothesis on the parsers that read what others wrote: the DICOM header walker (every received data set),
the NUT protocol client (a real TCP peer that answers with whatever hypothesis draws) and the site config.
Each either returns what it parsed or refuses with its own error type and a reason; nothing else escapes."""

from __future__ import annotations

import math
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgescreen.appliance.dicom import sop
from edgescreen.appliance.dicom.header import Refusal, check_instance, parse_dataset, split_file_meta
from tests import fuzz_support as fz

SYNTAXES = (*fz.SYNTAXES, "1.2.840.10008.1.2.4.50", "1.2.3.4")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return fz.base_files(tmp_path_factory.mktemp("bases"))


def test_header_walker_fuzz(bases: list[bytes]) -> None:
    counts = {"cases": 0, "crashes": 0, "quarantined": 0, "refused": 0, "accepted": 0}

    @fz.fuzz_settings(300)
    @given(fz.malformed_file(bases), st.sampled_from(SYNTAXES) | st.none())
    def one_case(case: tuple[bytes, list[str]], syntax: str | None) -> None:
        blob, _ = case
        counts["cases"] += 1
        meta, raw = split_file_meta(blob)  # the fuzzer keeps the meta whole
        ts = syntax or meta.transfer_syntax
        try:
            header = parse_dataset(raw, ts)
            check_instance(header, request_sop_class=meta.sop_class_uid, request_sop_uid=meta.sop_uid,
                           transfer_syntax=ts)
        except Refusal as refusal:
            assert refusal.reason and refusal.status in (sop.DATASET_DOES_NOT_MATCH_SOP_CLASS, sop.CANNOT_UNDERSTAND)
            counts["quarantined"] += 1
            return
        counts["accepted"] += 1
        assert header.sop_uid == meta.sop_uid and header.pixel_complete

    one_case()

    @fz.fuzz_settings(150)
    @given(st.binary(max_size=2048), st.sampled_from(SYNTAXES))
    def garbage(raw: bytes, ts: str) -> None:
        counts["cases"] += 1
        try:
            parse_dataset(raw, ts)
            counts["accepted"] += 1
        except Refusal as refusal:
            assert refusal.reason
            counts["refused"] += 1

    garbage()
    fz.record("header-walker", counts)


# -- NUT ------------------------------------------------------------------------------------------------
class ScriptedUpsd:
    """A TCP peer on loopback that answers every request with the next scripted reply (bytes as drawn)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.replies: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    while True:
                        data = conn.recv(4096)
                        if not data:
                            break
                        for _ in range(data.count(b"\n")):
                            reply = self.replies.pop(0) if self.replies else b""
                            if reply == b"<close>":
                                raise ConnectionResetError
                            conn.sendall(reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


_NUT_WORDS = st.sampled_from(["BEGIN", "LIST", "VAR", "END", "ERR", "UPS", "sim", "ups.status", "battery.charge",
                              "battery.runtime", "ups.realpower", "ups.load", "OL", "OB", "LB", "FSD", "WAIT",
                              "DATA-STALE", "UNKNOWN-UPS", "nan", "inf", "-1", "1e400", "42", '"', "\\", ""])


@st.composite
def nut_reply(draw: st.DrawFn) -> bytes:
    """A LIST VAR reply, from a plausible one with damage to raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    rows = draw(st.lists(st.tuples(_NUT_WORDS, _NUT_WORDS, st.text(max_size=20)), max_size=8))
    lines = [b"BEGIN LIST VAR sim"] if draw(st.booleans()) or not rows else []
    for a, b, value in rows:
        kind = draw(st.integers(0, 3))
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' if kind else value
        lines.append(f"VAR sim {b if kind == 3 else 'ups.status'} {quoted}".encode("utf-8", "replace")
                     if kind else f"{a} {b} {value}".encode("utf-8", "replace"))
    if draw(st.booleans()):
        lines.append(b"END LIST VAR sim")
    tail = draw(st.sampled_from([b"\n", b"", b"\r\n", b"<close>"]))
    return b"\n".join(lines) + (b"\n" if tail == b"<close>" else tail)


def test_nut_client_fuzz() -> None:
    from edgescreen.appliance.power.nut import NutPowerSource, quote, split_line

    counts = {"cases": 0, "crashes": 0, "quarantined": 0, "refused": 0, "accepted": 0}
    upsd = ScriptedUpsd()
    source = NutPowerSource("127.0.0.1", upsd.port, "sim", timeout_s=0.15)
    try:
        @fz.fuzz_settings(60)
        @given(st.lists(nut_reply(), min_size=1, max_size=3))
        def one_case(replies: list[bytes]) -> None:
            counts["cases"] += 1
            upsd.replies[:] = [r for reply in replies for r in reply.split(b"<close>\n") if r] or [b""]
            reading = source.read()
            assert not (reading.error or "").startswith("internal error"), reading.error
            if reading.stale:
                assert reading.error, "a stale reading must say why"
                counts["refused"] += 1
            else:
                counts["accepted"] += 1
                assert reading.status_raw
            for value in (reading.battery_percent, reading.runtime_s, reading.ups_realpower_w):
                assert value is None or math.isfinite(value)

        one_case()
    finally:
        source.close()
        upsd.close()

    @fz.fuzz_settings(300)
    @given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n\0"), max_size=12), max_size=6),
           st.text(max_size=60))
    def tokens(words: list[str], line: str) -> None:
        counts["cases"] += 1
        assert split_line(" ".join(quote(w) for w in words)) == [w for w in words]
        try:
            split_line(line)
        except ValueError as exc:
            assert "unterminated" in str(exc)

    tokens()
    fz.record("nut", counts)


# -- site config ----------------------------------------------------------------------------------------
_TOML_VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, width=32), st.booleans(),
                         st.text(max_size=20), st.lists(st.integers(0, 9), max_size=3))
_SECTIONS = ["dicom", "scheduler", "power", "web", "sync", "triage", "hardware", "logging", "site", "bogus"]
_KEYS = ["port", "ae_title", "bind", "idle_grace_s", "failsafe", "lease_s", "nut_host", "nut_port", "enabled", "url",
         "host", "threads", "level", "profile", "retry", "max_associations", "min_free_mb", "dicom_stale_s", "typo"]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "0.0"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@st.composite
def site_toml(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))  # not TOML at all
    parts = []
    for section in draw(st.lists(st.sampled_from(_SECTIONS), max_size=4, unique=True)):
        parts.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_KEYS), max_size=4, unique=True)):
            parts.append(f"{key} = {_toml(draw(_TOML_VALUES))}")
    return "\n".join(parts) + "\n"


def test_site_config_fuzz(tmp_path: Path) -> None:
    from edgescreen.appliance.config import ConfigError, load_site_config

    counts = {"cases": 0, "crashes": 0, "quarantined": 0, "refused": 0, "accepted": 0}
    path = tmp_path / "site.toml"

    @fz.fuzz_settings(150)
    @given(site_toml())
    def one_case(text: str) -> None:
        counts["cases"] += 1
        path.write_text(text)
        try:
            load_site_config(path)
            counts["accepted"] += 1
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(str(path)) and "\n" not in message.strip(), message
            counts["refused"] += 1

    one_case()
    fz.record("site-config", counts)
