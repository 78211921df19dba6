"""A loopback TCP server that hands each accepted connection to a method, for tests that must
misbehave below HTTP (trickle header lines or a body byte by byte, keep a connection open)."""

from __future__ import annotations

import socket
import threading
from typing import BinaryIO


def read_request(stream: BinaryIO) -> bool:
    """Read one HTTP/1.1 request, its head and its ``Content-Length`` body, from ``stream``
    (``conn.makefile("rb")``); False when the client closed the connection instead."""
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if not line:
        return False
    stream.read(length)
    return True


class RawServer:
    """Accepts connections on a loopback port, each handled by :meth:`handle` on a thread of
    its own. Counts the connections it accepted."""

    def __init__(self) -> None:
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/"

    def handle(self, conn: socket.socket) -> None:
        """Serve one accepted connection (closing it is the handler's)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting connections."""
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
