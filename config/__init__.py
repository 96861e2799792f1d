"""Configuration: process settings from the environment, the domain files, the Redis names.

``config.settings`` reads and checks environment variables; ``config.domains``
turns the TOML files in ``config/domains/`` (or ``SLOTENGINE_DOMAINS_DIR``)
into the engine's ``DomainPolicy`` objects. Both fail with ``ConfigError``,
one line naming the bad setting, before the server accepts a request.
``config.redis_keys`` names every key and channel a deployment keeps in Redis.

Nothing in this package may ever import the engine's shell, persistence or the
gateway: they read configuration, not the other way round.
"""

from config.domains import DomainConfig, load_domain_configs, load_policies, resolve_policy
from config.settings import ConfigError, Settings, load_settings

__all__ = [
    "ConfigError",
    "DomainConfig",
    "Settings",
    "load_domain_configs",
    "load_policies",
    "load_settings",
    "resolve_policy",
]
