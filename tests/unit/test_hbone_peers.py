"""Test helpers: an HBONE client/server pair and a raw HTTP/2 peer that can misbehave."""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from ztunnel.hbone import HboneClient, HboneConfig, HboneEvent, HboneServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Pair:
    """An HboneClient and HboneServer wired back to back in memory."""

    def __init__(self, config: HboneConfig | None = None, server_config: HboneConfig | None = None):
        self.now = 0.0
        self.client = HboneClient(config or HboneConfig(), self.now)
        self.server = HboneServer(server_config or config or HboneConfig(), self.now)
        self.client.initiate()
        self.server.initiate()
        self.pump()

    def pump(self) -> tuple[list[HboneEvent], list[HboneEvent]]:
        """Exchange bytes until both sides are quiet; return (client events, server events)."""
        c_events: list[HboneEvent] = []
        s_events: list[HboneEvent] = []
        for _ in range(1000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return c_events, s_events
            if to_server:
                s_events += self.server.receive_data(to_server, self.now)
            if to_client:
                c_events += self.client.receive_data(to_client, self.now)
        raise AssertionError("peers never went quiet")


class RawClient:
    """Speaks HTTP/2 frame by frame to an HboneServer; nothing stops it misbehaving."""

    def __init__(self, server: HboneServer, now: float = 0.0) -> None:
        self.server = server
        self.now = now
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.server.initiate()
        self.send(PREFACE + SettingsFrame(0).serialize() + ack_settings())

    def send(self, data: bytes) -> list[HboneEvent]:
        return self.server.receive_data(data, self.now)

    def headers(
        self, sid: int, headers: list[tuple[str, str]], *, end_stream: bool = False
    ) -> bytes:
        block = self.encoder.encode(headers)
        flags = 0x4 | (0x1 if end_stream else 0)
        return raw_frame(0x1, flags, sid, block)

    def frames(self) -> list[Any]:
        """The server's output so far as frames; HEADERS carry `.headers` (decoded)."""
        out = []
        for frame in parse_frames(self.server.data_to_send()):
            if isinstance(frame, HeadersFrame):
                frame.headers = self.decoder.decode(frame.data, raw=True)  # type: ignore[attr-defined]
            out.append(frame)
        return out


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )


def ack_settings() -> bytes:
    return raw_frame(0x4, 0x1, 0, b"")


def parse_frames(wire: bytes) -> list[Frame]:
    """Split an HTTP/2 byte stream (without preface) into frames."""
    frames = []
    view = memoryview(wire)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def goaway_codes(wire: bytes) -> list[int]:
    """Error codes of the GOAWAY frames in an output (other frames skipped)."""
    return [f.error_code for f in parse_frames(wire) if isinstance(f, GoAwayFrame)]
