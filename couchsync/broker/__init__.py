"""The RabbitMQ side of the worker: couchsync's queues, the consumer on them, and what becomes of each message.

    topology.py     the exchanges, queues and bindings, declared on every connection; connecting to a node
    delivery.py     a message being handled, couchsync's headers on it, the bounds of a republished one
    disposition.py  what becomes of a handled message (pure): ack, retry, dead letter, or hand back
    handlers.py     what the consumer is handed: the callables that handle, batch and route messages
    session.py      one connection's state
    settlement.py   a decision carried out on the channel (confirmed before the ack), counted and logged
    pausing.py      the pause while CouchDB fails, and the probes of its health that end it
    partition_share.py  the partitions this worker holds, and giving up those beyond its share
    consumer.py     Consumer: the message loop, batches, partitions, reconnection and shutdown

`couchsync.dead_letters` reads and replays the dead letters; `couchsync.held_queue` keeps the hold queue.
"""
