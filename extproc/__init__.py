"""Tollgate: budgets, rate limits and cost accounting for LLM APIs as an Envoy ext_proc sidecar."""

__version__ = "0.1.0"
