"""The actor shell: hosts shard cores, drives their timers from the real clock, moves batches.

It must never decide a business rule: every rule lives in ``engine.core``.
"""
