"""Bodies stream both ways through /gw/: a 1 GiB upload and a 1 GiB download pass in bounded memory.

The gateway, the target and the client all run in this test process, so its resident set size bounds all
three: sampled every few milliseconds while the bytes flow, it must stay within a small multiple of the
chunk sizes involved, far below the gibibyte that buffering anywhere would cost.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator

import httpx

from tests.gateway.conftest import RouteMaker
from tests.gateway.echo_target import EchoTarget
from tests.live_server import LiveServer

GIB = 1024**3
CHUNK = 1024 * 1024
# What the transfer may add to the process's resident set: buffers of a few chunks per party, not the body.
RSS_BOUND = 96 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


class _PeakRss:
    """The highest resident set size seen while the block runs (sampled by a thread)."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_a_1_gib_download_streams_in_bounded_memory(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("files", "/files", [echo.root_url], timeout_s=30)
    received = 0
    with _PeakRss() as memory, httpx.Client(timeout=60) as client:
        with client.stream("GET", live_gateway.url(f"/gw/files/download/{GIB}")) as response:
            assert response.status_code == 200
            for piece in response.iter_raw(CHUNK):
                received += len(piece)
    assert received == GIB
    assert memory.growth < RSS_BOUND, f"RSS grew by {memory.growth / 2**20:.0f} MiB"


def test_a_1_gib_upload_streams_in_bounded_memory(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("files", "/files", [echo.root_url], timeout_s=30)
    block = os.urandom(CHUNK)
    expected = hashlib.sha256()
    for _ in range(GIB // CHUNK):
        expected.update(block)

    def body() -> Iterator[bytes]:
        for _ in range(GIB // CHUNK):
            yield block

    with _PeakRss() as memory:
        response = httpx.post(
            live_gateway.url("/gw/files/upload"),
            content=body(),
            headers={"content-length": str(GIB)},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    assert response.json()["received"] == GIB
    assert response.json()["sha256"] == expected.hexdigest()
    assert memory.growth < RSS_BOUND, f"RSS grew by {memory.growth / 2**20:.0f} MiB"


def test_a_chunked_upload_without_length_streams_too(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("files", "/files", [echo.root_url])

    def body() -> Iterator[bytes]:
        for index in range(64):
            yield bytes([index]) * 65536

    response = httpx.post(live_gateway.url("/gw/files/upload"), content=body(), timeout=30)
    assert response.status_code == 200
    assert response.json()["received"] == 64 * 65536


def test_a_client_leaving_mid_download_closes_the_target_connection_and_is_a_499(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    from gateway_stats.usage import emitter
    from tests.proxy.helpers import UsageCapture

    route_make("files", "/files", [echo.root_url])
    capture = UsageCapture()
    emitter.sinks.append(capture)
    try:
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", live_gateway.url(f"/gw/files/download/{GIB}")) as response:
                for _piece in response.iter_raw(CHUNK):
                    break  # read one chunk, then leave
        assert echo.disconnected.wait(10), "the target kept sending after the client left"
        deadline = threading.Event()
        records: list = []
        for _ in range(100):
            records = capture.flushed()
            if records:
                break
            deadline.wait(0.05)
    finally:
        emitter.sinks.remove(capture)
    assert [(r.status, r.error_code) for r in records] == [(499, "client_disconnected")]
    assert 0 < records[0].response_bytes < GIB
