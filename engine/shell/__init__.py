"""The actor shell: hosts shard cores, drives their timers from the real clock, moves batches.

Nothing here decides a business rule; every rule lives in ``engine.core``.
"""
