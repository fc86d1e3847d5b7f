"""HBONE connection state machines (client and server), sans-IO over h2.

The I/O layer owns the socket: it calls ``receive_data(bytes, now)`` and acts
on the returned events, writes ``data_to_send()`` to the socket and calls
``handle_timeout(now)`` at ``next_deadline()``. Nothing here blocks, sleeps or
reads a clock.

Received bytes are split into frames here before h2 sees them: that is where
flood limits are counted (cheap: 9 header bytes per frame, payloads untouched),
where a graceful GOAWAY is taken out (h2 would close the connection at once,
killing the streams the peer asked to finish) and where runs of frames are cut
after SETTINGS (h2 checks frame sizes with the limit in force at the start of
each receive_data call, so a SETTINGS ACK followed by a large frame in one call
would otherwise be refused).

Plain DATA frames (no padding, outside a header block, within h2's frame size
limit) skip h2's frame buffer: h2 would copy each payload three times (into
its buffer, a slice of it, then the frame's bytes). On an open stream without
END_STREAM the windows are debited when the frame's header arrives and its
payload is handed over as it arrives, as views of the received bytes (no copy,
no buffering of a frame that spans reads); other plain DATA frames are copied
once and go straight to h2's frame handler, so flow control, stream states and
errors stay h2's. Sent DATA frames are made as one chunk each
(`data_to_send_chunks`), the payload copied once. That, and every other use
of h2's insides, is in h2compat.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import h2.events as h2e
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from ztunnel.hbone.config import HboneConfig, HboneError
from ztunnel.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    HboneEvent,
    RequestRejected,
    StreamData,
    StreamEnded,
    StreamReset,
    TunnelResponse,
    WindowOpened,
)
from ztunnel.hbone.flood import (
    CONTINUATION,
    DATA,
    FLAG_END_HEADERS,
    GOAWAY,
    HEADERS,
    PUSH_PROMISE,
    SETTINGS,
    Flood,
    FloodGuard,
)
from ztunnel.hbone.h2compat import HboneH2Connection, StreamState, data_frame_header
from ztunnel.hbone.wire import (
    BadRequest,
    build_connect_headers,
    header_list_size,
    parse_connect_request,
)

_PREAMBLE_LEN = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DEFAULT_MAX_FRAME = 16_384
_DEFAULT_WINDOW = 65_535  # RFC 9113 6.9.2: every connection window starts here
_MAX_STREAM_ID = 2**31 - 1
# h2 remembers how each closed stream ended, to judge frames that arrive for it late (they
# come within a round trip); its default of 65,536 streams grew a long-lived pooled
# connection by up to 7.5 MiB at each end. Per connection:
CLOSED_STREAMS_KEPT = 1024
_FLAG_PADDED = 0x8
_FLAG_END_STREAM = 0x1


class _HboneConnection:
    """What client and server share: framing, flow control, keepalive, drain, floods."""

    _server = False

    def __init__(self, config: HboneConfig | None = None, now: float = 0.0) -> None:
        self._config = config or HboneConfig()
        self._h2 = HboneH2Connection(
            H2Configuration(
                client_side=not self._server,
                header_encoding=None,
                # The server checks CONNECT requests itself (wire.parse_connect_request)
                # so that a malformed request is answered 400 instead of killing
                # the whole pooled connection.
                validate_inbound_headers=not self._server,
            ),
            closed_streams_kept=CLOSED_STREAMS_KEPT,
        )
        self._guard = FloodGuard(self._config, server=self._server)
        self._inbuf = bytearray()
        self._share = False  # while ingesting: `data` is immutable bytes (see _piece)
        # a fast-path DATA frame partly received: its stream and the bytes still to come
        self._rx_sid = 0
        self._rx_left = 0
        # output ready to go, in order, ahead of whatever h2 still holds
        self._chunks: list[bytes] = []
        self._preamble_left = _PREAMBLE_LEN if self._server else 0
        self._initiated = False
        self._closed = False
        self._now = now
        self._last_received = now
        self._ping_sent: float | None = None
        self._ping_payload = b""
        self._ping_ids = itertools.count(1)
        self._draining = False
        self._drain_last_id = _MAX_STREAM_ID
        self._peer_draining = False
        self._peer_last_id = _MAX_STREAM_ID
        self._block_stream: int | None = None
        self._block_frames = 0
        self._block_bytes = 0
        self._highest_peer_stream = 0
        self._blocked: set[int] = set()
        self._unacked: dict[int, int] = {}
        # Streams already answered/closed by us whose late events are swallowed.
        self._finished: set[int] = set()

    # ------------------------------------------------------------------ setup

    def initiate(self) -> None:
        """Queue the connection preface: SETTINGS and the connection window increase."""
        if self._initiated:
            raise HboneError("initiate() called twice on the same HBONE connection")
        self._initiated = True
        cfg = self._config
        self._h2.initiate_connection()
        settings: dict[SettingCodes | int, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: cfg.stream_window,
            SettingCodes.MAX_FRAME_SIZE: cfg.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
        }
        if self._server:
            settings[SettingCodes.MAX_CONCURRENT_STREAMS] = cfg.server_max_concurrent_streams
        else:
            settings[SettingCodes.ENABLE_PUSH] = 0
        self._h2.update_settings(settings)
        increment = cfg.connection_window - _DEFAULT_WINDOW
        if increment > 0:
            self._h2.increment_flow_control_window(increment)

    # --------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[HboneEvent]:
        """Feed bytes read from the peer; return what happened. Never raises on peer input."""
        if not self._initiated:
            raise HboneError("receive_data() before initiate(): send the preface first")
        if self._closed:
            return []
        self._now = now
        self._last_received = now
        events: list[HboneEvent] = []
        try:
            self._ingest(data, events)
        except Flood as flood:
            self._abort(flood.code, flood.reason, events)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the matching code already.
            code = int(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
            self._closed = True
            events.append(ConnectionTerminated(code, f"peer violated HTTP/2: {exc}"))
        except Exception as exc:  # hostile input must never crash the I/O layer
            self._abort(ErrorCodes.INTERNAL_ERROR, f"error handling peer data: {exc!r}", events)
        if not self._closed:
            self._maybe_finish(events)
        return events

    def _ingest(self, data: bytes | bytearray | memoryview, events: list[HboneEvent]) -> None:
        # Parse straight from `data` when nothing is pending: only a trailing
        # partial frame is copied into the buffer, and a DATA frame that takes the
        # fast path is handed over as its bytes arrive, never buffered.
        buffered = bool(self._inbuf)
        if buffered:
            self._inbuf += data
        # payload views of an immutable `data` may be handed over as they are (zero copy)
        self._share = not buffered and isinstance(data, bytes)
        pos = 0
        with memoryview(self._inbuf if buffered else data) as view:
            end = len(view)
            if self._rx_left:  # the rest of a DATA frame whose first bytes came before
                pos = min(self._rx_left, end)
                self._rx_left -= pos
                self._continue_data(self._rx_sid, view[:pos], events)
            if self._preamble_left:
                take = min(self._preamble_left, len(view))
                self._feed(view[:take], events)  # h2 checks the preamble bytes
                self._preamble_left -= take
                pos = take
            run_start = pos
            limit = max(self._config.max_frame_size, _DEFAULT_MAX_FRAME)
            while end - pos >= 9 and not self._closed:
                length = int.from_bytes(view[pos : pos + 3], "big")
                ftype = view[pos + 3]
                flags = view[pos + 4]
                sid = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
                if length > limit:
                    raise Flood(
                        ErrorCodes.FRAME_SIZE_ERROR,
                        f"peer sent a {length}-byte frame; SETTINGS_MAX_FRAME_SIZE is {limit}",
                    )
                frame_end = pos + 9 + length
                # a DATA frame h2compat's direct path may take (item 1); without END_STREAM,
                # item 5's fast path too
                direct = (
                    ftype == DATA
                    and self._h2.direct_data
                    and sid
                    and not flags & _FLAG_PADDED
                    and self._block_stream is None
                    and length <= self._h2.max_inbound_frame_size
                )
                plain_data = direct and not flags & _FLAG_END_STREAM
                if frame_end > end:
                    if plain_data and end - pos > 9:
                        # h2compat item 5 on a frame still arriving: its windows are debited
                        # now, its bytes handed over as they come (no buffering, no copy)
                        self._feed(view[run_start:pos], events)
                        run_start = pos
                        if not self._closed and self._h2.receive_data_fast(sid, length):
                            with view[pos + 9 : pos + 9] as empty:
                                self._guard.frame(ftype, flags, length, empty, self._now)
                            self._rx_sid = sid
                            self._rx_left = frame_end - end
                            self._continue_data(sid, view[pos + 9 : end], events)
                            pos = run_start = end
                    break
                payload = view[pos + 9 : frame_end]
                self._guard.frame(ftype, flags, length, payload, self._now)
                if self._block_stream is not None or ftype in (HEADERS, PUSH_PROMISE):
                    self._account_header_block(ftype, flags, sid, length)
                if ftype == GOAWAY and self._block_stream is None and length >= 8 and (
                    int.from_bytes(payload[4:8], "big") == ErrorCodes.NO_ERROR
                ):
                    self._feed(view[run_start:pos], events)
                    run_start = frame_end
                    last_id = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
                    self._peer_goaway(last_id, events)
                elif ftype == HEADERS and self._server and sid > self._highest_peer_stream:
                    self._feed(view[run_start:pos], events)
                    run_start = pos
                    self._check_stream_limit()
                    self._highest_peer_stream = sid
                elif direct:
                    if pos > run_start:
                        self._feed(view[run_start:pos], events)
                    run_start = frame_end
                    if not self._closed:
                        if plain_data and self._h2.receive_data_fast(sid, length):
                            if length:
                                self._on_fast_data(sid, self._piece(payload), events)
                        else:
                            self._feed_data_frame(sid, flags, payload, events)
                payload.release()
                pos = frame_end
                if ftype == SETTINGS:
                    self._feed(view[run_start:pos], events)
                    run_start = pos
            if pos > run_start and not self._closed:
                self._feed(view[run_start:pos], events)
            if not buffered:
                self._inbuf += view[pos:]
        if buffered:
            del self._inbuf[:pos]

    def _piece(self, view: memoryview) -> bytes | memoryview:
        """Payload bytes to hand over: a view when `data` was immutable bytes, else a copy."""
        return view[:] if self._share else bytes(view)

    def _continue_data(self, sid: int, view: memoryview, events: list[HboneEvent]) -> None:
        """Bytes of a fast-path DATA frame whose windows were debited when its header came."""
        with view:
            if not view:
                return
            if sid in self._finished or not self._h2.receiving(sid):
                # reset or closed meanwhile: nobody will consume them, the connection credit
                # goes back at once (h2 ignores the stream's part for a closed stream)
                self._h2.acknowledge_received_data(len(view), sid)
                return
            self._on_fast_data(sid, self._piece(view), events)

    def _account_header_block(self, ftype: int, flags: int, sid: int, length: int) -> None:
        """Bound a header block (HEADERS + CONTINUATION) in frames and bytes."""
        cap = 4 * self._config.max_header_list_size  # HPACK may expand at most ~4x
        if self._block_stream is not None:
            if ftype != CONTINUATION or sid != self._block_stream:
                return  # h2 rejects the interleaved frame as PROTOCOL_ERROR
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > self._config.max_continuation_frames:
                raise Flood(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"header block on stream {sid} split into more than "
                    f"{self._config.max_continuation_frames} CONTINUATION frames",
                )
            if flags & FLAG_END_HEADERS:
                self._block_stream = None
        elif ftype in (HEADERS, PUSH_PROMISE):
            self._block_bytes = length
            self._block_frames = 0
            if not flags & FLAG_END_HEADERS:
                self._block_stream = sid
        else:
            return
        if self._block_bytes > cap:
            raise Flood(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"header block on stream {sid} exceeds {cap} bytes "
                f"(SETTINGS_MAX_HEADER_LIST_SIZE is {self._config.max_header_list_size})",
            )

    def _check_stream_limit(self) -> None:
        limit = min(
            self._config.server_max_concurrent_streams,
            self._h2.local_settings.max_concurrent_streams,
        )
        if self._h2.open_inbound_streams >= limit:
            raise Flood(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"peer opened more than {limit} concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS)",
            )

    def _feed(self, chunk: memoryview, events: list[HboneEvent]) -> None:
        with chunk:
            if not len(chunk) or self._closed:
                return
            for ev in self._h2.receive_data(chunk):
                self._translate(ev, events)
                if self._closed:
                    return

    def _feed_data_frame(
        self, sid: int, flags: int, payload: memoryview, events: list[HboneEvent]
    ) -> None:
        """One complete plain DATA frame to h2's frame handler, like h2.receive_data would."""
        for ev in self._h2.receive_data_frame(sid, flags, payload):
            self._translate(ev, events)
            if self._closed:
                return

    def _translate(self, ev: h2e.Event, events: list[HboneEvent]) -> None:
        if isinstance(ev, h2e.DataReceived):
            self._on_data(ev, events)
        elif isinstance(ev, h2e.RequestReceived):
            self._on_request(ev, events)
        elif isinstance(ev, h2e.ResponseReceived):
            self._on_response(ev, events)
        elif isinstance(ev, h2e.StreamEnded):
            if ev.stream_id not in self._finished:
                events.append(StreamEnded(ev.stream_id))
        elif isinstance(ev, h2e.StreamReset):
            sid = ev.stream_id
            self._release(sid)
            if sid not in self._finished:
                events.append(StreamReset(sid, int(ev.error_code or 0)))
            self._finished.discard(sid)
        elif isinstance(ev, h2e.WindowUpdated):
            self._on_window(ev.stream_id, events)
        elif isinstance(ev, h2e.RemoteSettingsChanged):
            change = ev.changed_settings.get(SettingCodes.INITIAL_WINDOW_SIZE)
            if change is not None and (change.new_value or 0) > (change.original_value or 0):
                self._on_window(0, events)
        elif isinstance(ev, h2e.PingAckReceived):
            if self._ping_sent is not None and ev.ping_data == self._ping_payload:
                self._ping_sent = None
        elif isinstance(ev, h2e.ConnectionTerminated):
            self._closed = True
            detail = (ev.additional_data or b"").decode("utf-8", "replace")
            code = int(ev.error_code or 0)
            events.append(
                ConnectionTerminated(
                    code, f"peer sent GOAWAY({_code_name(code)})" + (f": {detail}" if detail else "")
                )
            )
        # Other h2 events (SETTINGS ACK, PING from the peer (h2 answers it),
        # trailers, 1xx, PRIORITY, unknown frames) need nothing from the I/O layer.

    def _on_data(self, ev: h2e.DataReceived, events: list[HboneEvent]) -> None:
        sid = ev.stream_id
        data = ev.data or b""
        flow = ev.flow_controlled_length or 0
        if sid in self._finished:
            self._h2.acknowledge_received_data(flow, sid)
            return
        if flow > len(data):  # padding is ours to hand back at once
            self._h2.acknowledge_received_data(flow - len(data), sid)
        if data:
            self._unacked[sid] = self._unacked.get(sid, 0) + len(data)
            events.append(StreamData(sid, data))

    def _on_fast_data(self, sid: int, data: bytes | memoryview, events: list[HboneEvent]) -> None:
        """What _on_data does for a DATA frame h2 did not see (h2compat item 5)."""
        if sid in self._finished:
            self._h2.acknowledge_received_data(len(data), sid)
            return
        self._unacked[sid] = self._unacked.get(sid, 0) + len(data)
        events.append(StreamData(sid, data))

    def _on_request(self, ev: h2e.RequestReceived, events: list[HboneEvent]) -> None:
        raise AssertionError("h2 client connections do not receive requests")

    def _on_response(self, ev: h2e.ResponseReceived, events: list[HboneEvent]) -> None:
        raise AssertionError("h2 server connections do not receive responses")

    def _on_window(self, sid: int | None, events: list[HboneEvent]) -> None:
        if not sid:
            if self._blocked:
                self._blocked.clear()
                events.append(WindowOpened(None))
        elif sid in self._blocked:
            self._blocked.discard(sid)
            events.append(WindowOpened(sid))

    def _peer_goaway(self, last_id: int, events: list[HboneEvent]) -> None:
        """A graceful GOAWAY: streams up to last_id finish, later ones were never seen."""
        self._peer_draining = True
        self._peer_last_id = min(self._peer_last_id, last_id)
        if self._server:
            return
        for sid in sorted(self._h2.tracked_stream_ids()):
            if sid > self._peer_last_id and not self._h2.stream_closed(sid):
                self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                self._release(sid)
                self._blocked.discard(sid)
                events.append(StreamReset(sid, int(ErrorCodes.REFUSED_STREAM)))

    # ------------------------------------------------------------ local actions

    def _check_usable(self, what: str) -> None:
        if not self._initiated:
            raise HboneError(f"{what}: call initiate() first")
        if self._closed:
            raise HboneError(f"{what}: the HBONE connection is closed")

    def _check_sendable(self, what: str, stream_id: int) -> None:
        """Raise HboneError unless we may send on the stream.

        Checked before calling h2: h2 answers a send in the wrong state by
        closing the stream, which would turn our own bug into a reset.
        """
        self._check_usable(what)
        state = self._h2.stream_state(stream_id)
        if state is None:
            raise HboneError(f"{what}: stream {stream_id} does not exist or is closed")
        if state not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            raise HboneError(
                f"{what}: stream {stream_id} is not open for sending "
                f"(state {state.name}: already ended or reset)"
            )
        if self._server and not self._h2.headers_sent(stream_id):
            raise HboneError(
                f"{what}: stream {stream_id} is not open for sending: respond(200) first"
            )

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue up to len(data) bytes within the flow-control windows; return how many.

        The rest must wait for a WindowOpened event for this stream (or None).
        """
        h2 = self._h2
        n = len(data)
        if n and h2.direct_data and not self._closed and h2.debit_send_fast(stream_id, n):
            # all of it in one frame on an open stream (h2compat item 5): what the general
            # path below ends up doing, without its separate checks and lookups
            self._chunks.append(b"".join((h2.data_to_send(), data_frame_header(stream_id, n), data)))
            self._guard.data_frames_sent(1, self._now)
            return n
        self._check_sendable("send_data", stream_id)
        total = len(data)
        if total == 0:
            return 0
        window = self._h2.local_flow_control_window(stream_id)
        take = min(total, window)
        if take <= 0:
            self._blocked.add(stream_id)
            return 0
        frame = h2.max_outbound_frame_size
        frames = 0
        with memoryview(data) as view:
            fast = h2.direct_data
            try:
                for off in range(0, take, frame):
                    n = min(frame, take - off)
                    if fast and h2.debit_send_fast(stream_id, n):
                        # h2compat item 5: the frame as one chunk, after what h2 queued before
                        # it: one copy of the payload, no buffer that grows with what is pending
                        self._chunks.append(b"".join(
                            (h2.data_to_send(), data_frame_header(stream_id, n), view[off : off + n])))
                    else:
                        h2.send_data(stream_id, view[off : off + n])
                    frames += 1
            except ProtocolError as exc:
                raise HboneError(f"send_data: stream {stream_id}: {exc}") from None
        self._guard.data_frames_sent(frames, self._now)
        if take < total:
            self._blocked.add(stream_id)
        return take

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM); the peer may keep sending."""
        self._check_sendable("end_stream", stream_id)
        try:
            self._h2.end_stream(stream_id)
        except (ProtocolError, KeyError) as exc:
            raise HboneError(f"end_stream: stream {stream_id} is not open for sending: {exc}") from None
        self._blocked.discard(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM); resetting an already closed stream is a no-op."""
        self._check_usable("reset_stream")
        if self._h2.stream_state(stream_id) is None:
            highest = max(self._h2.highest_inbound_stream_id, self._h2.highest_outbound_stream_id)
            if stream_id <= 0 or stream_id > highest:
                raise HboneError(f"reset_stream: stream {stream_id} was never opened")
        elif not self._h2.stream_closed(stream_id):
            try:
                self._h2.reset_stream(stream_id, error_code)
            except ProtocolError as exc:
                raise HboneError(f"reset_stream: stream {stream_id}: {exc}") from None
        self._release(stream_id)
        self._blocked.discard(stream_id)
        self._mark_finished(stream_id)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed n bytes of StreamData: give the peer that credit back."""
        if n < 0:
            raise HboneError(f"acknowledge_received: negative byte count {n}")
        pending = self._unacked.get(stream_id)
        if not n or pending is None or self._closed:
            return  # stream reset (credit already returned) or connection gone
        n = min(n, pending)
        if n == pending:
            del self._unacked[stream_id]
        else:
            self._unacked[stream_id] = pending - n
        h2 = self._h2
        if not (h2.direct_data and h2.acknowledge_fast(n, stream_id)):
            h2.acknowledge_received_data(n, stream_id)

    def _mark_finished(self, stream_id: int) -> None:
        self._finished.add(stream_id)
        if len(self._finished) > 2 * self._config.server_max_concurrent_streams:
            # Long-lived pooled connections: forget streams h2 has cleaned up
            # (late frames for them no longer reach us as events).
            self._finished &= self._h2.tracked_stream_ids()

    def _release(self, stream_id: int) -> None:
        """Return the connection credit of data the application will never consume."""
        pending = self._unacked.pop(stream_id, 0)
        if pending and not self._closed:
            self._h2.acknowledge_received_data(pending, stream_id)

    def start_drain(self) -> None:
        """Graceful GOAWAY: streams already open finish, new ones are refused.

        When the last stream closes, a ConnectionTerminated(NO_ERROR) follows
        (from receive_data or handle_timeout: next_deadline() turns due).
        """
        self._check_usable("start_drain")
        if self._draining:
            return
        last = self._h2.highest_inbound_stream_id if self._server else 0
        self._draining = True
        self._drain_last_id = last
        # h2 only knows the final GOAWAY (it closes its state machine at once),
        # so the first, graceful one is written here.
        frame = GoAwayFrame(0, last_stream_id=last, error_code=0, additional_data=b"draining")
        self._take_h2_output()
        self._chunks.append(frame.serialize())

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send the final GOAWAY and stop; nothing is accepted afterwards."""
        if self._closed or not self._initiated:
            self._closed = True
            return
        self._closed = True
        if not self._h2.goaway_done:
            self._h2.close_connection(error_code=error_code)

    def _abort(self, code: int, reason: str, events: list[HboneEvent]) -> None:
        if not self._h2.goaway_done:
            try:
                self._h2.close_connection(error_code=code, additional_data=reason.encode()[:512])
            except ProtocolError:
                pass
        self._closed = True
        events.append(ConnectionTerminated(int(code), reason))

    def _drained(self) -> bool:
        return (self._draining or self._peer_draining) and self.open_streams == 0

    def _maybe_finish(self, events: list[HboneEvent]) -> None:
        if self._drained():
            who = "we drained" if self._draining else "peer drained (GOAWAY)"
            self._closed = True
            if not self._h2.goaway_done:
                self._h2.close_connection(error_code=ErrorCodes.NO_ERROR)
            events.append(ConnectionTerminated(int(ErrorCodes.NO_ERROR), f"{who}; no streams left"))

    # ---------------------------------------------------------------- output/time

    def data_to_send(self) -> bytes:
        """All bytes queued for the peer, in order, batched into one buffer."""
        return b"".join(self.data_to_send_chunks())

    def data_to_send_chunks(self) -> list[bytes]:
        """All bytes queued for the peer, in order, as the frames were made: a DATA frame
        is one chunk (with whatever was queued before it), so the I/O layer can write
        each without joining them into one buffer the size of everything pending."""
        self._guard.output_taken()
        pending = self._h2.data_to_send()
        chunks = self._chunks
        if not chunks:
            return [pending] if pending else []
        self._chunks = []
        if pending:
            chunks.append(pending)
        return chunks

    def _take_h2_output(self) -> None:
        pending = self._h2.data_to_send()
        if pending:
            self._chunks.append(pending)

    def next_deadline(self) -> float | None:
        """When handle_timeout() must run next (keepalive, drain done), or None."""
        if self._closed or not self._initiated:
            return None
        if self._drained():
            return self._now
        interval = self._config.keepalive_interval
        if interval <= 0:
            return None
        if self._ping_sent is not None:
            return self._ping_sent + self._config.keepalive_timeout
        return self._last_received + interval

    def handle_timeout(self, now: float) -> list[HboneEvent]:
        """Send a keepalive PING, end on a missing PING ACK, or finish a drain."""
        events: list[HboneEvent] = []
        if self._closed or not self._initiated:
            return events
        self._now = max(self._now, now)
        if self._drained():
            self._maybe_finish(events)
            return events
        cfg = self._config
        if cfg.keepalive_interval <= 0:
            return events
        if self._ping_sent is not None:
            if now >= self._ping_sent + cfg.keepalive_timeout:
                self._abort(
                    ErrorCodes.NO_ERROR,
                    f"keepalive timeout: no PING ACK within {cfg.keepalive_timeout:g}s "
                    "(peer or network path dead)",
                    events,
                )
        elif now >= self._last_received + cfg.keepalive_interval:
            self._ping_payload = next(self._ping_ids).to_bytes(8, "big")
            self._h2.ping(self._ping_payload)
            self._ping_sent = now
        return events

    # ---------------------------------------------------------------- properties

    @property
    def open_streams(self) -> int:
        """Streams not yet closed in both directions."""
        if self._closed:
            return 0
        return int(self._h2.open_inbound_streams + self._h2.open_outbound_streams)

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def draining(self) -> bool:
        """Either side sent a graceful GOAWAY: no new streams on this connection."""
        return self._draining or self._peer_draining


class HboneServer(_HboneConnection):
    """The inbound side (port 15008): receives CONNECT requests and answers them."""

    _server = True

    def _on_request(self, ev: h2e.RequestReceived, events: list[HboneEvent]) -> None:
        sid = ev.stream_id
        if self._draining and sid > self._drain_last_id:
            # Opened after our GOAWAY: the client retries it on a new connection.
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self._mark_finished(sid)
            return
        try:
            target = parse_connect_request(ev.headers or [])
        except BadRequest as exc:
            self._answer_and_close(sid, 400)
            events.append(RequestRejected(sid, 400, str(exc)))
            return
        events.append(
            ConnectRequest(
                stream_id=sid,
                authority=target.authority,
                host=target.host,
                port=target.port,
                forwarded_for=target.forwarded_for,
                baggage=target.baggage,
                traceparent=target.traceparent,
            )
        )

    def _answer_and_close(self, sid: int, status: int) -> None:
        self._h2.send_headers(sid, [(b":status", str(status).encode())], end_stream=True)
        self._mark_finished(sid)
        if not self._h2.stream_closed(sid):
            # RFC 9113 8.1: a complete response lets us stop the request with NO_ERROR,
            # which frees the stream slot on both sides at once.
            self._h2.reset_stream(sid, ErrorCodes.NO_ERROR)
        self._release(sid)

    def respond(self, stream_id: int, status: int) -> None:
        """Answer a ConnectRequest: 200 opens the tunnel, anything else closes the stream."""
        self._check_usable("respond")
        if not 200 <= status <= 599:
            raise HboneError(f"respond: status {status} is not a final HTTP status")
        if self._h2.stream_closed(stream_id) or self._h2.headers_sent(stream_id):
            raise HboneError(
                f"respond: stream {stream_id} cannot be answered (unknown, reset or "
                "already answered)"
            )
        try:
            if status == 200:
                self._h2.send_headers(stream_id, [(b":status", b"200")], end_stream=False)
            else:
                self._answer_and_close(stream_id, status)
        except (ProtocolError, KeyError) as exc:
            raise HboneError(
                f"respond: stream {stream_id} cannot be answered (unknown, reset or "
                f"already answered): {exc}"
            ) from None


class HboneClient(_HboneConnection):
    """The outbound side: opens CONNECT streams to a peer's port 15008."""

    _server = False

    def can_open_stream(self) -> bool:
        """True when open_stream() will succeed: a slot is free and nobody is draining."""
        if self._closed or not self._initiated or self.draining:
            return False
        if self._h2.highest_outbound_stream_id >= _MAX_STREAM_ID - 2:
            return False
        limit = min(
            self._config.client_max_concurrent_streams,
            self._h2.remote_settings.max_concurrent_streams,
        )
        return bool(self._h2.open_outbound_streams < limit)

    def open_stream(
        self,
        authority: str,
        forwarded_for: str | None = None,
        baggage: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        """Send a CONNECT for `ip:port`; return the stream id. Raise HboneError when no slot."""
        self._check_usable("open_stream")
        if not self.can_open_stream():
            why = (
                "the connection is draining (GOAWAY)"
                if self.draining
                else f"all {self._config.client_max_concurrent_streams} stream slots are in use "
                "(or the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached)"
            )
            raise HboneError(f"open_stream: no stream slot: {why}; use another connection")
        headers = build_connect_headers(authority, forwarded_for, baggage, traceparent)
        peer_limit = self._h2.remote_settings.max_header_list_size
        if peer_limit is not None and header_list_size(headers) > peer_limit:
            raise HboneError(
                f"open_stream: headers are {header_list_size(headers)} bytes, over the peer's "
                f"SETTINGS_MAX_HEADER_LIST_SIZE {peer_limit}; shorten baggage/traceparent"
            )
        sid = int(self._h2.get_next_available_stream_id())
        self._h2.send_headers(sid, headers, end_stream=False)
        return sid

    def _on_response(self, ev: h2e.ResponseReceived, events: list[HboneEvent]) -> None:
        sid = ev.stream_id
        status = _status(ev.headers or [])
        events.append(TunnelResponse(sid, status))
        if status != 200:
            self._mark_finished(sid)
            if not self._h2.stream_closed(sid):
                if ev.stream_ended:
                    self._h2.end_stream(sid)  # a refusal with END_STREAM: close our side too
                else:
                    self._h2.reset_stream(sid, ErrorCodes.CANCEL)
            self._release(sid)


def _status(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value)
    return 0  # h2 validates responses: unreachable in practice


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"
