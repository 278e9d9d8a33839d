"""The gRPC edge: ext_proc servicer, worker processes, supervisor and HTTP endpoints."""
