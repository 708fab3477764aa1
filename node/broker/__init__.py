"""The broker model: vhosts, exchanges, bindings, queues, consumers. Pure and deterministic.

Must never import anyio, asyncio, pysyncobj, socket, or read a clock.
"""
