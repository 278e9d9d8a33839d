"""Code generated from protos/ at build time (setup.py). Not checked in."""
