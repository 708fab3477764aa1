"""The broker model: vhosts, exchanges, bindings, queues, consumers. Pure and deterministic.

Modules: `types` (values shared with the channel layer), `model` (the Broker: every
operation, RabbitMQ's rules and reply texts), `entities` (its mutable records), `errors`
(AmqpError builders), `args` (x-argument equivalence and validation), `exchange_type` and
`registry` (the exchange-type plug-in interface, by name) with one module per type
(`direct`, `fanout`, `topic`, `headers`), `views` (read-only views), `snapshot` (JSON
documents of the state, no pickle). `cluster.state.StateMachine` drives it with commands.

Must never import anyio, asyncio, pysyncobj, socket, or read a clock.
"""
