"""The pure, synchronous engine core.

Everything here is sans-I/O: commands and the current time go in, results and
domain events come out. No module in this package may import asyncio, Ray,
Redis, asyncpg, aiohttp or touch the network or the disk; a test enforces it.
"""
