"""Sans-I/O AMQP 0-9-1: bytes in, frames and events out; methods in, bytes out.

Must never import anyio, asyncio, pysyncobj or socket, and never read a clock (time is
passed in).
"""
