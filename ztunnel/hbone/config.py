"""HBONE settings and limits (one frozen dataclass) and the package's error base."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ztunnel import ZtunnelError

MIB = 1024 * 1024
# RFC 9113 6.5.2: bounds of SETTINGS_MAX_FRAME_SIZE and of any flow-control window.
_MIN_FRAME = 16_384
_MAX_FRAME = 16_777_215
_MAX_WINDOW = 2**31 - 1


class HboneError(ZtunnelError):
    """Misuse of the HBONE layer by our own code (bad argument, closed stream...).

    Peer misbehaviour never raises: it becomes a ConnectionTerminated,
    StreamReset or RequestRejected event.
    """


@dataclass(frozen=True)
class HboneConfig:
    """HTTP/2 settings and flood limits of one HBONE connection.

    Defaults follow Istio's ztunnel (4 MiB stream window, 16 MiB connection
    window, 1 MiB frames); the flood limits are per connection and counted
    over ``flood_window`` seconds.
    """

    stream_window_mib: float = 4.0
    connection_window_mib: float = 16.0
    max_frame_size: int = MIB
    server_max_concurrent_streams: int = 200
    client_max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    keepalive_interval: float = 10.0  # seconds without received frames before a PING; 0 = off
    keepalive_timeout: float = 20.0  # seconds to wait for the PING ACK
    flood_window: float = 10.0
    max_resets_per_window: int = 500  # RST_STREAM from clients (CVE-2023-44487)
    max_pings_per_window: int = 100
    max_settings_per_window: int = 100
    max_control_frames_per_window: int = 1000  # PRIORITY, unknown frame types
    max_pending_control_frames: int = 1000  # PING/SETTINGS ACKs queued, not yet taken
    max_window_updates_per_window: int = 1000  # plus window_updates_per_data_frame per DATA sent
    window_updates_per_data_frame: int = 10
    max_small_window_updates: int = 100  # increments below 1 KiB ("data dribble")
    max_small_frames_per_window: int = 20_000
    small_frame_bytes: int = 32
    max_consecutive_empty_frames: int = 10
    max_continuation_frames: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise HboneError(f"HboneConfig.{f.name}={value!r}: must be a number >= 0")
        if not _MIN_FRAME <= self.max_frame_size <= _MAX_FRAME:
            raise HboneError(
                f"HboneConfig.max_frame_size={self.max_frame_size}: HTTP/2 allows "
                f"{_MIN_FRAME}..{_MAX_FRAME} bytes"
            )
        for name in ("stream_window_mib", "connection_window_mib"):
            size = int(getattr(self, name) * MIB)
            if not 65_535 <= size <= _MAX_WINDOW:
                raise HboneError(
                    f"HboneConfig.{name}={getattr(self, name)}: the window must be "
                    f"64 KiB..2 GiB (HTTP/2 flow-control limits)"
                )
        for name in ("server_max_concurrent_streams", "client_max_concurrent_streams"):
            if getattr(self, name) < 1:
                raise HboneError(f"HboneConfig.{name}: must allow at least 1 stream")
        if self.max_header_list_size < 1024:
            raise HboneError(
                f"HboneConfig.max_header_list_size={self.max_header_list_size}: "
                "below 1 KiB no CONNECT request fits"
            )
        if self.keepalive_interval > 0 and self.keepalive_timeout <= 0:
            raise HboneError("HboneConfig.keepalive_timeout: must be > 0 when keepalive is on")
        if self.flood_window <= 0:
            raise HboneError("HboneConfig.flood_window: must be > 0 seconds")

    @property
    def stream_window(self) -> int:
        """Initial per-stream receive window, in bytes."""
        return int(self.stream_window_mib * MIB)

    @property
    def connection_window(self) -> int:
        """Connection-level receive window, in bytes."""
        return int(self.connection_window_mib * MIB)
