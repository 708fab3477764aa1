"""Sans-I/O AMQP 0-9-1: bytes in, frames and events out; methods in, bytes out.

Must never import anyio, asyncio, pysyncobj or socket, and never read a clock (time is
passed in).

Modules: `constants` (reply codes, limits), `errors` (ProtocolError and RabbitMQ's reply
texts), `fields` (field tables), `methods` (method argument codec), `codec` (frames: the
stream decoder, encoders, content properties), `events` and `connection` (the server-side
connection state machine the I/O shell drives).
"""
