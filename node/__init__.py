"""Warren node: everything that serves AMQP 0-9-1 clients on one broker node."""

__version__ = "0.1.0"
