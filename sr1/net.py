"""Binding a listening address for sr1's servers (retrieval and rollout engine)."""

from __future__ import annotations

import errno
import socket

from sr1.errors import Sr1Error


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0 = any free port), not yet listening.

    Bound before a server loads anything, so a port already in use is a one-line Sr1Error at
    once (the CLI: ``error: port P on HOST is in use``, exit 2).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Sr1Error(f"cannot listen on {host}: {e.strerror}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # "localhost": 127.0.0.1
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise Sr1Error(f"port {port} on {host} is in use") from None
        raise Sr1Error(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sock
