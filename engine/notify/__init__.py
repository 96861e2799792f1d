"""Notifications: committed changes reach people and systems that hold no live connection.

A shard's flush appends its events to the transactional outbox (PostgreSQL,
same transaction as the change); delivery workers (``slotengine notify``, one
inside every ``slotengine serve`` unless ``--no-notify``) fan them out into
deliveries, signed webhooks (Standard Webhooks) and email with calendar files,
retried with backoff until delivered or dead.
"""
