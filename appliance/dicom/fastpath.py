"""A faster receive path for pynetdicom's acceptor, through its own extension point (the request handler).

Why: stock pynetdicom 3.0 polls. Its DUL thread sleeps 1 ms whenever no PDU is waiting, its
association thread sleeps 1 ms per loop before looking for a finished DIMSE message, and its socket
reads a PDU 4 KiB per recv(). For a 512 KiB CT slice answered only after an fsync, those sleeps add
one to three milliseconds of pure waiting to every instance, on top of the CPU. Here:

* a complete C-STORE request is served right in the DUL thread that decoded it (the SCU waits for
  the response anyway: DICOM without asynchronous operations has one request in flight), so an
  instance costs no thread hand-off at all; its response is then sent by that same thread. On a
  busy 2-core box every hand-off is a wait for a CPU slice and for the GIL;
* the C-STORE response command set is encoded by hand (seven fixed elements) instead of building and
  encoding a pydicom Dataset twice (once for the group length);
* the DUL thread blocks in select() on the socket AND a wake-up pipe that is written whenever the
  association queues a primitive to send;
* the association thread blocks on an Event set when a DIMSE message or an A-RELEASE/A-ABORT arrives;
* a PDU is read with recv_into() straight into one buffer of its announced length.

The two reactor loops and `_create_association` are copies of pynetdicom 3.0.4's with only the
waiting (and the classes created) changed, and the inline serving leans on its internals
(`_serve_request`, `_accepted_cx`, `_sent_abort`, `_reactor_checkpoint`, `_kill`, `_is_paused`, the
DUL's `_kill_thread`, `_idle_timer`, `event_queue`, `state_machine`, `to_provider_queue`,
`to_user_queue`, `_process_recv_primitive`, `_is_transport_event`), so all of this is used only with
the exact pynetdicom versions listed in VALIDATED; with any other version the stock request handler is
used (slower, same behaviour) and the service says so once at start.

No thread ever waits for itself. Serving inline means pynetdicom's own abort paths (an exception in a
service class, a C-STORE naming a SOP class its context does not carry) run in the DUL thread, and
stock `abort()` then blocks in `kill()` until that very thread stops: forever, holding one of the
`max_associations` slots and keeping the process alive after SIGTERM (the DUL thread is not a daemon).
Here an abort from the DUL thread only queues the A-ABORT and hands the rest to the association thread,
and every wait for the DUL to stop is bounded (KILL_WAIT_S), after which the DUL is told to stop and
its socket closed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import struct
import threading
import time
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

# The exact pynetdicom releases whose internals (module docstring) this was checked against.
VALIDATED = ("3.0.4",)
# The longest a reactor waits without a wake-up: bounds how late ARTIM/idle timers and kill() are seen.
IDLE_WAIT_S = 0.05
# The longest anything waits for a DUL thread to reach Sta1 and stop before it is stopped regardless.
KILL_WAIT_S = 10.0


def available(version: str | None = None) -> bool:
    """True for a validated pynetdicom release (exact match: a new release may rename what we touch)."""
    return (version or pynetdicom.__version__) in VALIDATED


class _KickQueue(queue.Queue):
    """A queue whose put() also wakes whoever waits for it (a pipe for select, or an Event)."""

    def __init__(self, kick: Any) -> None:
        super().__init__()
        self._kick = kick

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._kick()


def _uid_element(elem: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHL", 0x0000, elem, len(raw)) + raw


def _us_element(elem: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0x0000, elem, 2, value)


def encode_c_store_rsp(rsp: C_STORE) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), implicit VR little endian as PS3.7 6.3.1 requires."""
    body = (_uid_element(0x0002, str(rsp.AffectedSOPClassUID))
            + _us_element(0x0100, 0x8001)
            + _us_element(0x0120, int(rsp.MessageIDBeingRespondedTo))
            + _us_element(0x0800, 0x0101)  # no data set follows
            + _us_element(0x0900, int(rsp.Status))
            + _uid_element(0x1000, str(rsp.AffectedSOPInstanceUID)))
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


class FastDIMSE(DIMSEServiceProvider):
    """Sends plain C-STORE responses with the hand encoder; everything else the stock way."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.ErrorComment is None
                and primitive.OffendingElement is None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + encode_c_store_rsp(primitive)))
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


class _InlineStoreQueue(_KickQueue):
    """The association's DIMSE message queue: C-STORE requests are served on put(), in the DUL thread.

    Only a valid request on an accepted context, outside release, is served inline; anything else
    (and every other message) is queued for the association thread exactly as pynetdicom does.
    """

    def __init__(self, assoc: FastAssociation) -> None:
        super().__init__(assoc._kick.set)
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        assoc = self._assoc
        if (type(msg) is C_STORE and msg.is_valid_request and context_id in assoc._accepted_cx
                and not assoc._sent_release and assoc.is_established):
            assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


class FastAssociationSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes` (or what came before the peer closed) into one buffer."""
        sock = self.socket
        if sock is None:  # closed under us (an abort): the DUL reads "nothing" and sees the transport close
            return bytearray()
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:])
            if not n:
                del view
                return buf[:got]
            got += n
        return buf


class FastDUL(DULServiceProvider):
    """The DUL reactor, waiting in select() on the socket and a wake-up pipe instead of sleeping 1 ms."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _KickQueue(self.wake)
        self._assoc_kick = threading.Event()
        self.to_user_queue = _KickQueue(self._assoc_kick.set)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def _wait(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        fds: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket was closed under us: let the state machine see it
            time.sleep(0.001)
            return
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 4096)

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's DUL loop with `time.sleep(run_loop_delay)` replaced by `_wait()`."""
        try:
            self._run()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: abort, never leave the peer hanging
                log.error("DUL reactor failed; aborting the association", error=repr(exc))
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class FastAssociation(Association):
    """An acceptor whose reactor wakes on arriving DIMSE messages instead of polling every 1 ms."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = FastDUL(self)
        self._kick = self.dul._assoc_kick
        self.dimse = FastDIMSE(self)
        self.dimse.msg_queue = _InlineStoreQueue(self)
        self._aborted_inline = False

    def _in_dul_thread(self) -> bool:
        return threading.current_thread() is self.dul

    def _abort_blocking(self, block: bool = True) -> None:
        """From the DUL thread (inline serving) an abort only queues the A-ABORT: the association thread
        then finishes it (module docstring). From any other thread, pynetdicom's abort."""
        if self._in_dul_thread():
            if self._sent_abort or self.is_released:
                return
            super()._abort_blocking(False)
            self._aborted_inline = True
            self._kick.set()
            return
        super()._abort_blocking(block)

    def kill(self) -> None:
        """pynetdicom's kill, except that the DUL thread never waits for itself and nobody waits forever."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        self._kick.set()
        if self._in_dul_thread():
            return  # the association thread sees _kill and stops this DUL when it ends (run_reactor)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.dul.is_alive() and not self.dul.stop_dul():
            if time.monotonic() > deadline:
                log.warning("DUL did not stop in time; closing the association's socket",
                            calling_ae=str(self.requestor.ae_title), state=self.dul.state_machine.current_state)
                self.dul.kill_dul()
                with contextlib.suppress(Exception):
                    cast(AssociationSocket, self.dul.socket).close()
                self.dul.join(timeout=1.0)
                return
            time.sleep(0.01)

    def run_reactor(self) -> None:
        """pynetdicom's, plus: whatever way it ended, the DUL thread is stopped before this thread exits (an
        association whose DUL outlives it would keep the process from exiting after SIGTERM)."""
        try:
            super().run_reactor()
        finally:
            if self.dul.is_alive():
                self.kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop with `time.sleep(0.001)` replaced by waiting for a kick."""
        self._is_paused = False
        while not self._kill:
            self._kick.wait(IDLE_WAIT_S)
            self._kick.clear()

            if self._aborted_inline:  # an abort raised while serving inline: finish it from this thread
                self.is_aborted = True
                self.is_established = False
                self.kill()
                return

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._kick.set()  # look again at once: more may have queued while we served

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("network timeout reached; aborting the association",
                            calling_ae=self.requestor.ae_title)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class FastRequestHandler(RequestHandler):
    """pynetdicom's RequestHandler creating a FastAssociation with a FastAssociationSocket."""

    def _create_association(self) -> Association:
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(FastAssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # negotiation only reads these (presentation.negotiate_as_acceptor builds new contexts), so a
        # shallow copy is enough; the stock deepcopy costs ~30 ms of CPU per association
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
