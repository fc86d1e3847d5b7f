"""Every use of h2's and hyperframe's private or undocumented API, in one place, gated on their versions.

connection.py drives h2 through its public API and through the subclass
`HboneH2Connection` below, never through anything else of h2's insides; a test
(tests/unit/test_h2compat.py) fails, saying what to do, when an h2 or
hyperframe release changes what this module relies on. Nothing here patches
h2, hyperframe or hpack: what changes is confined to our own connections.

What each private use buys (in-memory numbers: `ztunnel/hbone/bench.py`, 256 MiB
through one tunnel, glibc's mmap and trim thresholds raised so that page faults
do not blur the comparison, median of 21 runs; CPU per 256 MiB received):

1. Received DATA frames skip h2's frame buffer (`receive_data_frame`: private
   `H2Connection._receive_frame`, and the instance's `_frame_dispatch_table`
   for item 2). h2.receive_data copies each payload three times (into its
   buffer, a slice of it, the frame's bytes); here it is copied once, then
   h2's own per-frame handler takes the parsed frame, so flow control, stream
   states and errors stay h2's. 67 ms instead of 79 (3,860 MiB/s instead of
   3,270). On the ztunnel pair's bulk transfer, with item 2, two ztunnels went
   from 2.2-2.5 to 1.5-1.8 ms of CPU per MB (370-410 to 460-550 MB/s).
2. h2 formats `repr(frame)` for its trace log on every received frame, before
   it calls the logger (so a no-op logger does not help), and hyperframe's
   repr of a DATA frame joins and hex-encodes the whole payload to show 10
   bytes of it: through h2.receive_data that is 308 ms instead of 79 (830
   MiB/s). The frames of item 1 are `_QuietDataFrame`s, whose repr is cheap;
   h2 dispatches on the exact class, so each of our connections maps that
   class to h2's DATA handler. Frames that take h2's public path (padded DATA,
   and all DATA when item 1 is off) keep hyperframe's repr and its cost.
3. Closed-stream memory (`MAX_CLOSED_STREAMS`, an undocumented knob h2 reads
   when a connection is made): h2 remembers how each closed stream ended, to
   judge frames that arrive for it late (they come within a round trip). Its
   default of 65,536 streams at ~120 bytes each grew a long-lived pooled
   connection by up to 7.5 MiB at each end.
4. Stream and connection state (`H2Connection.streams`, `H2Stream.state_machine`,
   `H2Connection.state_machine`; public names, undocumented): checked before
   sending, because h2 answers a send in the wrong state by closing the stream;
   and the fact that reading `open_inbound_streams`/`open_outbound_streams`
   drops closed streams from `streams` (`tracked_stream_ids`).

5. Plain DATA frames on an open stream skip h2's per-frame machinery both ways
   (`receive_data_fast`, `debit_send_fast`: private `H2Stream._inbound_window_manager`,
   `_expected_content_length`, `_actual_content_length`, `H2Connection._data_to_send`,
   `_inbound_flow_control_window_manager`). For a DATA frame without END_STREAM
   or padding on a stream whose state machine would only keep its state (OPEN,
   and HALF_CLOSED_LOCAL receiving / HALF_CLOSED_REMOTE sending), with no
   content-length to track, h2 does nothing but debit the connection's and
   the stream's windows and frame (or unframe) the bytes; these do exactly
   that and nothing else, and hand every other case (a window that would go
   negative, END_STREAM, any other state) to h2's own path, which raises what
   h2 raises. Per small message (64 bytes, in memory, on a loaded 2-core
   machine): receive and acknowledge 8.4 -> 4.1 µs, send 6.8 -> 2.0 µs; through
   two ztunnels, about half the proxies' CPU per round trip (bench/README.md).
   Receiving, the windows are debited when the frame's header arrives
   (`receive_data_fast(stream_id, length)`), so connection.py hands the payload
   over as it arrives instead of buffering a frame that spans reads; sending,
   `debit_send_fast` debits and connection.py makes the frame itself (one chunk
   per frame, the payload copied once). Bulk, 1 and 8 connections: the two
   ztunnels' CPU per GB down 10-13%, throughput against HAProxy 0.75 -> 0.93
   and 0.52 -> 0.68 (bench/README.md, item 5).

6. Acknowledged bytes are counted into h2's window managers directly while no
   WINDOW_UPDATE is due (`acknowledge_fast`: private `WindowManager._bytes_processed`,
   `H2Stream._inbound_window_manager`, and h2's rule for when an update is due,
   copied in `_would_update`); when one is due, or the stream is not open, h2's
   `acknowledge_received_data` takes them. h2's version logs, validates, looks
   the stream up, runs both managers and joins an empty list of frames for
   every acknowledgement, which is every message received.

Items 1, 2, 5 and 6 are gated: they are on only for the h2 and hyperframe versions
below, those this module's tests passed with. Outside them, or when an
attribute they need is missing, DATA frames take h2's public receive_data
(correct, slower) and the reason is logged once. Items 3 and 4 have no public
equivalent: they apply at any version, and the tests say when they break.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import h2
import h2.events as h2e
import hyperframe
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.exceptions import ProtocolError
from h2.stream import StreamState
from hyperframe.frame import DataFrame

__all__ = [
    "CHECKED_H2",
    "CHECKED_HYPERFRAME",
    "DIRECT_DATA_OFF",
    "HboneH2Connection",
    "StreamState",
    "data_frame_header",
    "direct_data_off_reason",
]

log = logging.getLogger("ambit.ztunnel.hbone")

# (major, minor) ranges, both ends included, that the private uses above were
# checked against: h2 4.1.0, 4.2.0, 4.3.0 and 4.4.1; hyperframe 6.0.1 and 6.1.0.
# (Before 4.4, h2 refuses to send a CONNECT without :path, so HBONE itself needs
# 4.4: pyproject.toml.)
CHECKED_H2 = ((4, 1), (4, 4))
CHECKED_HYPERFRAME = ((6, 0), (6, 1))


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def direct_data_off_reason(
    h2_version: str, hyperframe_version: str, *, has_frame_handler: bool
) -> str | None:
    """Why the DATA fast path (items 1 and 2) must stay off with these versions, or None."""
    for name, version, (low, high) in (
        ("h2", h2_version, CHECKED_H2),
        ("hyperframe", hyperframe_version, CHECKED_HYPERFRAME),
    ):
        got = _major_minor(version)
        if got is None or not low <= got <= high:
            return (
                f"{name} {version} is outside the versions ztunnel.hbone.h2compat was checked "
                f"against ({name} {low[0]}.{low[1]} to {high[0]}.{high[1]})"
            )
    if not has_frame_handler:
        return f"h2 {h2_version} has no H2Connection._receive_frame"
    return None


# None: received DATA frames take the fast path; else why they do not (tests set it too).
DIRECT_DATA_OFF: str | None = direct_data_off_reason(
    h2.__version__,
    hyperframe.__version__,
    has_frame_handler=callable(getattr(H2Connection, "_receive_frame", None)),
)
_logged_off = False
# item 5: where a DATA frame without END_STREAM keeps the stream (and connection) state as it is
_RECEIVING = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
_SENDING = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_OPEN = frozenset({ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN})


def _log_off_once(reason: str) -> None:
    global _logged_off
    if not _logged_off:
        _logged_off = True
        log.warning(
            "HBONE: received DATA frames take h2's public path (correct, but about 4 times "
            "the CPU per byte received): %s. Run tests/unit/test_h2compat.py and "
            "test_hbone_data_frames.py with this version and widen CHECKED_H2/"
            "CHECKED_HYPERFRAME in ztunnel/hbone/h2compat.py when they pass.",
            reason,
        )


def data_frame_header(stream_id: int, length: int) -> bytes:
    """The 9 bytes before the payload of a DATA frame without flags (RFC 9113 4.1, 6.1)."""
    return length.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")


def _would_update(window: Any, processed: int) -> bool:
    """h2's WindowManager._maybe_update_window would send an increment with `processed`."""
    size, top = window.current_window_size, window.max_window_size
    return bool((size == 0 and processed > min(1024, top // 4)) or processed >= top // 2)


class _QuietDataFrame(DataFrame):
    """A DATA frame whose repr does not hex-encode its payload (item 2)."""

    def __repr__(self) -> str:
        return f"DataFrame(stream_id={self.stream_id}, flags={self.flags!r}): <{len(self.data)} bytes>"


class HboneH2Connection(H2Connection):
    """h2's connection with HBONE's uses of its insides (see the module docstring)."""

    def __init__(self, config: H2Configuration, *, closed_streams_kept: int,
                 max_header_list_size: int | None = None) -> None:
        # Item 3: h2 sizes its closed-stream history from this attribute in __init__.
        self.MAX_CLOSED_STREAMS = closed_streams_kept
        if max_header_list_size is not None:
            # h2 sizes its HPACK decoder's hard limit (and its initial local setting) from this
            # undocumented attribute in __init__; the owner advertises the same value.
            self.DEFAULT_MAX_HEADER_LIST_SIZE = max_header_list_size
        super().__init__(config)
        off = DIRECT_DATA_OFF
        table = getattr(self, "_frame_dispatch_table", None)
        if off is None and not (isinstance(table, dict) and DataFrame in table):
            off = f"h2 {h2.__version__} has no per-connection _frame_dispatch_table for DataFrame"
        #: True when `receive_data_frame`, `receive_data_fast`, `debit_send_fast`
        #: and `acknowledge_fast` may be used.
        self.direct_data = off is None
        if off is not None:
            _log_off_once(off)
        else:
            assert isinstance(table, dict)
            table[_QuietDataFrame] = table[DataFrame]

    def receive_data_frame(self, stream_id: int, flags: int, payload: memoryview) -> list[h2e.Event]:
        """One complete, unpadded DATA frame outside a header block, within the acknowledged
        frame size: what h2.receive_data would return for it (only while `direct_data`)."""
        frame = _QuietDataFrame(stream_id)
        frame.parse_flags(flags)
        frame.parse_body(payload)  # the one copy
        try:
            events: list[h2e.Event] = self._receive_frame(frame)
        except ProtocolError as exc:
            # what receive_data does with it: queue the GOAWAY, then raise
            self.close_connection(error_code=exc.error_code)
            raise
        return events

    def receive_data_fast(self, stream_id: int, length: int) -> bool:
        """Item 5: the header of a DATA frame of `length` bytes without END_STREAM or padding,
        outside a header block, has arrived (its payload may still be on its way): debit h2's
        windows for the whole frame as h2 would and return True; False (nothing done) when
        h2's own path must take the frame."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _RECEIVING:
            return False
        if self.state_machine.state not in _OPEN or stream._expected_content_length is not None:
            return False
        conn_window = self._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if conn_window.current_window_size < length or stream_window.current_window_size < length:
            return False  # h2 raises the flow-control error
        conn_window.current_window_size -= length
        stream_window.current_window_size -= length
        stream._actual_content_length += length
        return True

    def receiving(self, stream_id: int) -> bool:
        """True while the stream may still receive DATA (item 5: the rest of a frame whose
        header took the fast path is handed over only while this holds)."""
        stream = self.streams.get(stream_id)
        return stream is not None and stream.state_machine.state in _RECEIVING

    def debit_send_fast(self, stream_id: int, n: int) -> bool:
        """Item 5, the sending half without the framing: debit the windows for one DATA frame
        of n bytes without END_STREAM as h2.send_data would, and return True; the caller then
        owes the peer that frame (`data_frame_header` + the bytes), after whatever h2 has
        queued so far (`data_to_send()`). False (nothing done) when h2's own path must send it."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _SENDING or not stream.state_machine.headers_sent:
            return False
        if (self.state_machine.state not in _OPEN or n > self.max_outbound_frame_size
                or n > self.outbound_flow_control_window or n > stream.outbound_flow_control_window):
            return False
        stream.outbound_flow_control_window -= n
        self.outbound_flow_control_window -= n
        return True

    def acknowledge_fast(self, n: int, stream_id: int) -> bool:
        """Item 6: hand back n consumed bytes of an open stream when neither window manager
        would emit a WINDOW_UPDATE for them yet (h2's rule: half the window consumed, or an
        empty window and some consumed), by counting them as h2 does; False (nothing done)
        when h2's acknowledge_received_data must take them (it then sends the update)."""
        stream = self.streams.get(stream_id)
        if n <= 0 or stream is None or stream.state_machine.state is not StreamState.OPEN:
            return False
        conn_window = self._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        conn_done = conn_window._bytes_processed + n
        stream_done = stream_window._bytes_processed + n
        if _would_update(conn_window, conn_done) or _would_update(stream_window, stream_done):
            return False
        conn_window._bytes_processed = conn_done
        stream_window._bytes_processed = stream_done
        return True

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The stream's state, or None when h2 no longer tracks it (closed and cleaned up)."""
        stream = self.streams.get(stream_id)
        return None if stream is None else stream.state_machine.state  # type: ignore[no-any-return]

    def stream_closed(self, stream_id: int) -> bool:
        """True when the stream is closed, whether or not h2 still tracks it."""
        return self.stream_state(stream_id) in (None, StreamState.CLOSED)

    def headers_sent(self, stream_id: int) -> bool:
        """True when we have sent HEADERS on the stream (False when h2 does not track it)."""
        stream: Any = self.streams.get(stream_id)
        return stream is not None and bool(stream.state_machine.headers_sent)

    def tracked_stream_ids(self) -> set[int]:
        """The streams h2 still tracks, after it has let go of the closed ones."""
        _ = self.open_inbound_streams, self.open_outbound_streams  # h2 prunes as it counts
        return set(self.streams)

    @property
    def goaway_done(self) -> bool:
        """h2 has sent or received the final GOAWAY: it accepts nothing more on this connection."""
        return bool(self.state_machine.state == ConnectionState.CLOSED)
