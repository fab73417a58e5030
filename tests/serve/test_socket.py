"""The listening socket: accepted connections get TCP_NODELAY (without it, Nagle held each small
response's body behind its headers until the client's delayed ACK, ~40 ms per request on Linux)."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable

import httpx

from runtime.serve.server import bind


def test_bind_makes_a_tcp_socket_so_asyncio_sets_nodelay() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio's _set_nodelay checks exactly this
    finally:
        sock.close()


def test_small_responses_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(fake_server: Callable) -> None:
    server, _ = fake_server()
    with httpx.Client() as client:
        client.get(server.url + "/health")
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert client.get(server.url + "/health").status_code == 200
            times.append(time.perf_counter() - t0)
    # Nagle + delayed ACK costs >= 40 ms per response, every time; a busy machine costs a few ms
    assert statistics.median(times) < 0.02, [round(t * 1000, 1) for t in times]
