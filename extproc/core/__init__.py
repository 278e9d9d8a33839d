"""The pure core: request facts in, decisions out.

Nothing in this package imports asyncio, grpc, redis or protobuf, and nothing reads the clock:
time arrives as an argument. That keeps every rule here testable with plain tables.
"""
