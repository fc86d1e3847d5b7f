"""What an HTTP/2 peer sends, split into frames before h2 sees it. Pure.

Three jobs, each cheap (9 header bytes per frame, payloads untouched):
- flood limits: every frame is counted by the ztunnel's `FloodGuard` (rapid
  reset, PING/SETTINGS floods, tiny frames...), which raises `Flood`;
- header blocks are bounded in frames and bytes (a CONTINUATION flood would
  otherwise grow h2's buffer without limit before HPACK even sees it);
- a graceful GOAWAY (NO_ERROR) is taken out and reported as `GracefulGoaway`:
  h2 would close the connection at once and refuse to send anything more,
  killing the responses the peer still waits for.

Frames larger than our SETTINGS_MAX_FRAME_SIZE end the connection here
(FRAME_SIZE_ERROR), before they are buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2.errors import ErrorCodes

from ztunnel.hbone.config import HboneConfig
from ztunnel.hbone.flood import (
    CONTINUATION,
    FLAG_END_HEADERS,
    GOAWAY,
    HEADERS,
    PUSH_PROMISE,
    Flood,
    FloodGuard,
)

__all__ = ["Flood", "FrameSplitter", "GracefulGoaway"]

PREFACE_LEN = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", which the client sends first


@dataclass(frozen=True)
class GracefulGoaway:
    """The peer sent GOAWAY(NO_ERROR): streams above `last_stream_id` (ours) were not seen."""

    last_stream_id: int


class FrameSplitter:
    """Splits one connection's received bytes into runs of whole frames for h2."""

    def __init__(self, *, server: bool, max_frame_size: int = 16_384,
                 max_header_list_size: int = 64 * 1024, max_continuation_frames: int = 16,
                 max_resets: int = 1000, max_small_frames: int = 100_000) -> None:
        self.guard = FloodGuard(
            HboneConfig(max_header_list_size=max_header_list_size,
                        max_continuation_frames=max_continuation_frames,
                        max_resets_per_window=max_resets,
                        max_small_frames_per_window=max_small_frames),
            server=server,
        )
        self._max_frame = max_frame_size
        # encoded bytes; a peer's Huffman coding can make fields up to ~4x longer than decoded
        self._block_cap = 4 * max_header_list_size
        self._max_continuation = max_continuation_frames
        self._preface_left = PREFACE_LEN if server else 0
        self._buf = bytearray()
        self._block_stream: int | None = None
        self._block_frames = 0
        self._block_bytes = 0

    def feed(self, data: bytes, now: float) -> list[bytes | GracefulGoaway]:
        """Bytes read from the peer -> what to give h2, in order. Raises `Flood`."""
        self._buf += data
        buf = self._buf
        out: list[bytes | GracefulGoaway] = []
        pos = 0
        if self._preface_left:
            take = min(self._preface_left, len(buf))
            self._preface_left -= take
            pos = take  # h2 checks the preface bytes themselves
        run_start = 0
        end = len(buf)
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            if length > self._max_frame:
                raise Flood(ErrorCodes.FRAME_SIZE_ERROR,
                            f"peer sent a {length}-byte frame; SETTINGS_MAX_FRAME_SIZE is "
                            f"{self._max_frame}")
            frame_end = pos + 9 + length
            if frame_end > end:
                break
            with memoryview(buf)[pos + 9 : frame_end] as payload:
                self.guard.frame(ftype, flags, length, payload, now)
                graceful = (
                    ftype == GOAWAY and self._block_stream is None and length >= 8
                    and int.from_bytes(payload[4:8], "big") == ErrorCodes.NO_ERROR
                )
                last_id = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF if graceful else 0
            self._account_header_block(ftype, flags, sid, length)
            if graceful:
                if pos > run_start:
                    out.append(bytes(buf[run_start:pos]))
                out.append(GracefulGoaway(last_id))
                run_start = frame_end
            pos = frame_end
        if pos > run_start:
            out.append(bytes(buf[run_start:pos]))
        del buf[:pos]
        return out

    def _account_header_block(self, ftype: int, flags: int, sid: int, length: int) -> None:
        if self._block_stream is not None:
            if ftype != CONTINUATION or sid != self._block_stream:
                return  # h2 refuses the interleaved frame (PROTOCOL_ERROR)
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > self._max_continuation:
                raise Flood(ErrorCodes.ENHANCE_YOUR_CALM,
                            f"header block on stream {sid} split into more than "
                            f"{self._max_continuation} CONTINUATION frames")
            if flags & FLAG_END_HEADERS:
                self._block_stream = None
        elif ftype in (HEADERS, PUSH_PROMISE):
            self._block_bytes = length
            self._block_frames = 0
            if not flags & FLAG_END_HEADERS:
                self._block_stream = sid
        else:
            return
        if self._block_bytes > self._block_cap:
            raise Flood(ErrorCodes.ENHANCE_YOUR_CALM,
                        f"header block on stream {sid} exceeds {self._block_cap} bytes")
