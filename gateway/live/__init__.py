"""Live updates: ``WS /ws/bookings``, ``WS /ws/queue/{slotId}`` and the SSE stream.

The modules: ``bus`` (``EventBus``: the Redis pub/sub subscription of one
gateway process), ``watches`` (``QueueWatch``, ``BookingWatch``: one
connection's view of the engine), ``outbox`` (``Outbox``: a connection's
bounded send queue), ``endpoints`` (the WebSocket and SSE handlers,
``LiveConnections``, ``add_realtime``). Each builds on the one before it in
the order bus, outbox, watches, endpoints and never on one after it; all of
them on ``gateway.http`` and ``gateway.handling``, never on the routes or
the operations endpoints.

Theory of operation
-------------------
Shards publish their events to Redis pub/sub once they are committed
(``engine/shell/events.py``): one message per flush on the shard's channel,
each event tagged with who it concerns (its slot, and its user for bookings).
Each gateway process has one ``EventBus``: one pub/sub connection, subscribed
to the shard channels its connections need (reference counted), read by one
task that decodes only the events someone here watches and hands them to the
watches of their slot or user, synchronously and in order. So a client
connected to any gateway sees changes made through any other.

A watch is one connection's view of the engine:

- ``QueueWatch``: one user's place in one slot's queue, and the slot;
- ``BookingWatch``: one user's bookings.

A watch subscribes first and reads its snapshot from the engine second, so no
change can fall between the two (the read says ``watch=True``: a shard that
nobody listened to publishes again from that read on); events that the
snapshot already reflects are recognised and skipped:

- the waiting line numbers its departures per shard incarnation (``epoch``,
  ``departures``): a ``QueueMoved`` is applied only if it is the next departure
  after the watch's; an older one is skipped, and a gap or another epoch (a
  rebuilt shard, pub/sub messages lost while Redis was away) makes the watch
  read a fresh snapshot;
- a slot view carries a revision that grows with every change, bookings a
  version: what is not newer than what was sent is skipped.

Partitions move between shards while the engine serves (``engine/shell/
rebalance.py``), and a moved slot's events come on its new owner's channel.
Each connection's ``Interests`` are the channels its watch needs by the
partition map: the slot's shard, or every shard for bookings. When the
gateway's engine client takes a newer map (told by ``MAP_CHANGED`` on the
bus channel, by a periodic read, or by a shard refusing a moved partition),
every connection whose shards changed subscribes to the new ones, drops those
it no longer needs and reads its snapshot again (with ``watch=True``, from
the new owner, whose events carry another ``epoch``); the connection stays
open throughout.

Every connection sends through an ``Outbox``: a bounded queue drained by one
task. A consumer that falls ``OUTBOX_MESSAGES_MAX`` messages behind is
disconnected (close code 1013, "try again later"; on reconnecting it gets the
current state first), so a slow client costs bounded memory and never delays
anyone else. Connections are pinged (WebSocket) or sent a comment (SSE) every
``HEARTBEAT_S``.

Each user holds a bounded number of live connections across the deployment:
a connection takes a place in its user's record in Redis before it subscribes
or upgrades, and gives it back when it ends (``gateway/connlimit.py``). Past
the cap the request is answered 429 ``TooManyConnections``.

A user who watches their queue place counts as active, as a position poll
would count them: every ``touch_every_s`` (a third of the shortest queue
inactivity timeout served, at most 30 s) each gateway process sends one
``TouchWaiting`` per shard naming the (slot, user) places its queue
connections watch (``LiveConnections.keep_active``). A touch emits no event
and is not stored; a watcher whose gateway dies is seen no more, and the
inactivity timeout runs from their last touch.

This package never changes engine state but for that touch: it reads
snapshots and forwards committed events.
"""
