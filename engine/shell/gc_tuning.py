"""The cyclic garbage collector as a long-running engine process tunes it.

A shard actor or a gateway holds many long-lived objects (a shard's records;
a gateway's live connections, some hundred tracked objects each). CPython's
default thresholds run a young collection every 700 net allocations and a
full one every hundred of those; a full collection walks every tracked
object, which in a gateway holding 10,000 WebSockets took 600-790 ms, a stall
for every connection and request of that process. Raising the young
generation's threshold to ``GC_GEN0_THRESHOLD`` makes collections fewer and
larger, and full ones as much rarer; freezing what exists at start keeps the
imported modules and loaded state out of every later scan. Cyclic garbage is
still collected, later.

It must never disable the collector: cyclic garbage is still collected, later.
"""

import gc

from engine.shell import limits


def tune_gc() -> None:
    """Fewer, larger young collections, and no rescans of what was loaded at start."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(limits.GC_GEN0_THRESHOLD, gen1, gen2)
