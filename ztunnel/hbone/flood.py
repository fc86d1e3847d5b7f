"""Flood accounting for one HTTP/2 connection: counts received frames, never does I/O.

The connection reports every complete received frame (type, flags, stream,
length) before h2 parses it; the guard raises Flood when the peer exceeds a
limit of HboneConfig. Limits are counted per fixed window of
``flood_window`` seconds, which bounds the CPU and memory a peer can make us
spend per window no matter how it spreads its frames.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

from ztunnel.hbone.config import HboneConfig

# RFC 9113 frame types and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4

SMALL_WINDOW_INCREMENT = 1024


class Flood(Exception):
    """The peer broke a limit; the connection ends with GOAWAY(code)."""

    def __init__(self, code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Counter:
    """Events in the current fixed window."""

    __slots__ = ("count", "limit", "name", "started")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.count = 0
        self.started = float("-inf")


class FloodGuard:
    """Per-connection frame accounting; see the module docstring."""

    def __init__(self, config: HboneConfig, *, server: bool) -> None:
        self._config = config
        self._server = server
        self._window = config.flood_window
        self.resets = _Counter("RST_STREAM frames (rapid reset)", config.max_resets_per_window)
        self.pings = _Counter("PING frames", config.max_pings_per_window)
        self.settings = _Counter("SETTINGS frames", config.max_settings_per_window)
        self.control = _Counter("PRIORITY/unknown frames", config.max_control_frames_per_window)
        self.window_updates = _Counter("WINDOW_UPDATE frames", config.max_window_updates_per_window)
        self.small_updates = _Counter(
            "WINDOW_UPDATE frames with increments below 1 KiB", config.max_small_window_updates
        )
        self.small_frames = _Counter(
            f"DATA/CONTINUATION frames under {config.small_frame_bytes} bytes",
            config.max_small_frames_per_window,
        )
        self._data_frames_sent = 0
        self._data_sent_started = float("-inf")
        self.pending_control = 0
        self.empty_in_a_row = 0

    def _hit(self, counter: _Counter, now: float, extra_allowance: int = 0) -> None:
        if now - counter.started >= self._window:
            counter.started = now
            counter.count = 0
        counter.count += 1
        if counter.count > counter.limit + extra_allowance:
            raise Flood(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"peer sent more than {counter.limit + extra_allowance} {counter.name} "
                f"in {self._window:g}s",
            )

    def data_frames_sent(self, n: int, now: float) -> None:
        """We sent n DATA frames: each earns the peer a few WINDOW_UPDATEs."""
        if now - self._data_sent_started >= self._window:
            self._data_sent_started = now
            self._data_frames_sent = 0
        self._data_frames_sent += n

    def output_taken(self) -> None:
        """The I/O layer took data_to_send(): queued ACKs are on their way."""
        self.pending_control = 0

    def frame(self, ftype: int, flags: int, length: int, payload: memoryview, now: float) -> None:
        """Account one complete received frame; raise Flood when a limit is broken."""
        cfg = self._config
        empty = length == 0 and (
            (ftype == DATA and not flags & FLAG_END_STREAM)
            or (ftype in (HEADERS, CONTINUATION) and not flags & FLAG_END_HEADERS)
        )
        if empty:
            self.empty_in_a_row += 1
            if self.empty_in_a_row > cfg.max_consecutive_empty_frames:
                raise Flood(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"peer sent {self.empty_in_a_row} empty DATA/HEADERS/CONTINUATION "
                    "frames in a row",
                )
        else:
            self.empty_in_a_row = 0

        if ftype == DATA:
            if length < cfg.small_frame_bytes and not flags & FLAG_END_STREAM:
                self._hit(self.small_frames, now)
        elif ftype == CONTINUATION:
            if length < cfg.small_frame_bytes and not flags & FLAG_END_HEADERS:
                self._hit(self.small_frames, now)
        elif ftype == RST_STREAM:
            # Rapid reset is a client-side attack on servers; a server resetting
            # our streams costs us little (our pool bounds them).
            if self._server:
                self._hit(self.resets, now)
        elif ftype == PING:
            if not flags & FLAG_ACK:
                self._hit(self.pings, now)
                self._pending()
        elif ftype == SETTINGS:
            if not flags & FLAG_ACK:
                self._hit(self.settings, now)
                self._pending()
        elif ftype == WINDOW_UPDATE:
            allowance = 0
            if now - self._data_sent_started < self._window:
                allowance = cfg.window_updates_per_data_frame * self._data_frames_sent
            self._hit(self.window_updates, now, allowance)
            if length == 4:
                increment = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
                if 0 < increment < SMALL_WINDOW_INCREMENT:
                    self._hit(self.small_updates, now)
        elif ftype not in (HEADERS, GOAWAY, PUSH_PROMISE):
            self._hit(self.control, now)

    def _pending(self) -> None:
        self.pending_control += 1
        if self.pending_control > self._config.max_pending_control_frames:
            raise Flood(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"peer queued more than {self._config.max_pending_control_frames} PING/SETTINGS "
                "acknowledgements without reading them",
            )
