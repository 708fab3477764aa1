"""AMQP errors the broker model returns, worded exactly as RabbitMQ 3.10 words them.

Rules: every function returns an `AmqpError` value (the model never raises for a client's
mistake). Reply codes are named constants; each error carries the class and method id of
the method that caused it. `connection=True` marks the hard errors that close the whole
connection (503 COMMAND_INVALID, 530 NOT_ALLOWED, 540 NOT_IMPLEMENTED); every other code
closes only the channel.
"""

from __future__ import annotations

from enum import Enum

from node.broker.types import AmqpError

ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
COMMAND_INVALID = 503
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540


class Method(Enum):
    """(class id, method id) of the client methods the model answers."""

    EXCHANGE_DECLARE = (40, 10)
    EXCHANGE_DELETE = (40, 20)
    EXCHANGE_BIND = (40, 30)
    EXCHANGE_UNBIND = (40, 40)
    QUEUE_DECLARE = (50, 10)
    QUEUE_BIND = (50, 20)
    QUEUE_PURGE = (50, 30)
    QUEUE_DELETE = (50, 40)
    QUEUE_UNBIND = (50, 50)
    BASIC_QOS = (60, 10)
    BASIC_CONSUME = (60, 20)
    BASIC_CANCEL = (60, 30)
    BASIC_PUBLISH = (60, 40)
    BASIC_GET = (60, 70)
    BASIC_ACK = (60, 80)
    BASIC_REJECT = (60, 90)
    BASIC_RECOVER = (60, 110)
    BASIC_NACK = (60, 120)
    NONE = (0, 0)


def error(code: int, text: str, method: Method, *, connection: bool = False) -> AmqpError:
    class_id, method_id = method.value
    return AmqpError(code, text, class_id, method_id, connection)


def no_queue(vhost: str, name: str, method: Method) -> AmqpError:
    return error(NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost '{vhost}'", method)


def no_exchange(vhost: str, name: str, method: Method) -> AmqpError:
    return error(NOT_FOUND, f"NOT_FOUND - no exchange '{name}' in vhost '{vhost}'", method)


def no_vhost(vhost: str, method: Method) -> AmqpError:
    return error(NOT_ALLOWED, f"NOT_ALLOWED - vhost {vhost} not found", method, connection=True)


def default_exchange(method: Method) -> AmqpError:
    text = "ACCESS_REFUSED - operation not permitted on the default exchange"
    return error(ACCESS_REFUSED, text, method)


def reserved_name(kind: str, name: str, method: Method) -> AmqpError:
    text = f"ACCESS_REFUSED - {kind} name '{name}' contains reserved prefix 'amq.*'"
    return error(ACCESS_REFUSED, text, method)


def system_exchange(vhost: str, name: str) -> AmqpError:
    text = f"ACCESS_REFUSED - deletion of system exchange '{name}' in vhost '{vhost}' not allowed"
    return error(ACCESS_REFUSED, text, Method.EXCHANGE_DELETE)


def internal_exchange(vhost: str, name: str) -> AmqpError:
    text = f"ACCESS_REFUSED - cannot publish to internal exchange '{name}' in vhost '{vhost}'"
    return error(ACCESS_REFUSED, text, Method.BASIC_PUBLISH)


def unknown_exchange_type(type_name: str) -> AmqpError:
    # RabbitMQ 3.10 closed the connection (503 COMMAND_INVALID); current RabbitMQ closes
    # only the channel with 406, and pika's own acceptance suite expects that. We follow
    # current RabbitMQ.
    text = f"PRECONDITION_FAILED - unknown exchange type '{type_name}'"
    return error(PRECONDITION_FAILED, text, Method.EXCHANGE_DECLARE)


def inequivalent(
    kind: str, vhost: str, name: str, key: str, received: str, current: str, method: Method
) -> AmqpError:
    text = (
        f"PRECONDITION_FAILED - inequivalent arg '{key}' for {kind} '{name}' in vhost "
        f"'{vhost}': received {received} but current is {current}"
    )
    return error(PRECONDITION_FAILED, text, method)


def flag(value: bool) -> str:
    return "'true'" if value else "'false'"


def locked(vhost: str, name: str, method: Method) -> AmqpError:
    text = (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost "
        f"'{vhost}'. It could be originally declared on another connection or the exclusive "
        "property value does not match that of the original declaration."
    )
    return error(RESOURCE_LOCKED, text, method)


def in_use(kind: str, vhost: str, name: str, method: Method) -> AmqpError:
    text = f"PRECONDITION_FAILED - {kind} '{name}' in vhost '{vhost}' in use"
    return error(PRECONDITION_FAILED, text, method)


def not_empty(vhost: str, name: str) -> AmqpError:
    text = f"PRECONDITION_FAILED - queue '{name}' in vhost '{vhost}' not empty"
    return error(PRECONDITION_FAILED, text, Method.QUEUE_DELETE)


def exclusive_use(vhost: str, name: str) -> AmqpError:
    text = f"ACCESS_REFUSED - queue '{name}' in vhost '{vhost}' in exclusive use"
    return error(ACCESS_REFUSED, text, Method.BASIC_CONSUME)


def reused_tag(tag: str) -> AmqpError:
    text = f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"
    return error(NOT_ALLOWED, text, Method.BASIC_CONSUME, connection=True)


def unknown_tag(tag: int, method: Method) -> AmqpError:
    return error(PRECONDITION_FAILED, f"PRECONDITION_FAILED - unknown delivery tag {tag}", method)


def precondition(text: str, method: Method) -> AmqpError:
    return error(PRECONDITION_FAILED, text, method)


def invalid_consumer_arg(vhost: str, queue: str, key: str, detail: str) -> AmqpError:
    text = (
        f"PRECONDITION_FAILED - invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': "
        f"{detail}"
    )
    return error(PRECONDITION_FAILED, text, Method.BASIC_CONSUME)


def not_implemented(text: str, method: Method) -> AmqpError:
    return error(NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - {text}", method, connection=True)


def invalid_expiration(text: str, detail: str) -> AmqpError:
    message = f"PRECONDITION_FAILED - invalid expiration '{text}': {detail}"
    return error(PRECONDITION_FAILED, message, Method.BASIC_PUBLISH)
