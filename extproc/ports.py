"""Is a TCP port free to listen on? Asked before a stack binds its ports.

Envoy listeners and the extproc workers bind with SO_REUSEPORT (so several processes of ONE stack
share a port). The kernel lets ANY process of the same user join such a port, so a second stack
on the same port would silently get half the traffic. Probing with a socket that does not set
SO_REUSEPORT fails whenever anyone listens there, which makes the clash a clear start-up error.
"""

from __future__ import annotations

import socket


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR only skips sockets in TIME_WAIT (a stack that just stopped); Linux still
        # refuses the bind while another socket listens on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
