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


#: Lanes per extproc (`TOLLGATE_GRPC_LANES`, `--extproc-lanes`): the Envoy config and the
#: extproc default to the same number, so the two agree unless someone changes one of them.
DEFAULT_LANES = 16


def lane_name(grpc_port: int, lane: int) -> str:
    """The abstract Unix socket of one lane (Linux; no file, gone with the process).

    Why lanes: with only the shared SO_REUSEPORT port, each Envoy worker thread keeps ONE
    HTTP/2 connection to the extproc, and the kernel hands each connection to one worker
    process. Measured on 2 cores (2 Envoy threads, 2 workers): whole runs where one worker did
    all the work and the other idled, whenever the threads' connections, or the client
    connections over the threads, landed unevenly. With lanes, every Envoy thread holds a
    connection per lane and round-robins streams over them; lane j belongs to worker
    j mod workers, so the load splits evenly by construction. Named after the gRPC port, which
    is unique per stack on one network namespace (a pod, or a host)."""
    return f"tollgate-{grpc_port}-lane-{lane}"


def worker_lanes(index: int, workers: int, lanes: int) -> list[int]:
    """The lanes worker `index` of `workers` serves: j mod workers == index."""
    return [lane for lane in range(lanes) if lane % max(workers, 1) == index]
