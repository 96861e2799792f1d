"""Who a shard actor is: its name on a Ray cluster, and the identity it shows.

Shard actors are detached and found by name, so two deployments on one Ray
cluster must never share a name: a gateway would adopt the other
deployment's actor and write into its database. A deployment's actors are
therefore named after its deployment namespace (``slotengine:<digest>``, the
prefix of its Redis keys, named by its database:
``persistence.migrate.deployment_namespace``): ``slotengine-<digest>-shard-<n>``,
in the Ray namespace ``RAY_NAMESPACE``. Tests and benches give explicit
prefixes of their own; the default namespace gives the plain prefix
``slotengine-shard`` (``slotengine demo``, in-memory actors).

A name is only a claim: an actor found under it shows its ``ShardIdentity``
(its shard and layout, the deployment namespace it was started with, the
fingerprint of the database it reaches itself), and ``check_identities``
refuses one of another layout, deployment or database with one line naming
both.

It must never import Ray, talk to a cluster or read settings: the gateway and
the CLI name actors with it without paying for Ray.
"""

import re
from typing import Final

import msgspec

from config.redis_keys import NAMESPACE_DEFAULT
from engine.shell.errors import ShardFailed

# The Ray namespace of the shard actors every gateway of a deployment shares.
RAY_NAMESPACE: Final = "slotengine"
# The name prefix of the default namespace's shard actors.
SHARD_ACTOR_PREFIX: Final = "slotengine-shard"


def deployment_prefix(namespace: str) -> str:
    """The name prefix of the shard actors of the deployment whose Redis keys start
    with ``namespace``: ``slotengine:4f2a9c1b3d7e`` gives ``slotengine-4f2a9c1b3d7e-shard``."""
    if namespace == NAMESPACE_DEFAULT:
        return SHARD_ACTOR_PREFIX
    return f"{namespace.replace(':', '-')}-shard"


def actor_name(shard: int, name_prefix: str = SHARD_ACTOR_PREFIX) -> str:
    return f"{name_prefix}-{shard}"


def shard_of(name: str, name_prefix: str) -> int | None:
    """The shard an actor named ``name`` serves, if the name is one of ``name_prefix``'s."""
    found = re.fullmatch(rf"{re.escape(name_prefix)}-(0|[1-9][0-9]*)", name)
    return None if found is None else int(found.group(1))


class ShardIdentity(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: int
    shard_count: int
    pid: int
    # True when Ray rebuilt this actor after its process died.
    restarted: bool
    # The deployment namespace it was started with (its Redis keys), and the
    # fingerprint of the database it reaches; both None for an in-memory shard.
    deployment: str | None = None
    database: str | None = None
    # The Ray node it runs on, and the Unix socket on which it also takes batches
    # from callers of that node (``engine.shell.ray_actor``); None where it has none.
    node: str | None = None
    socket: str | None = None

    def serves(self) -> str:
        """Which deployment and database, in words for a one-line error."""
        if self.deployment is None:
            return "no deployment (an in-memory shard)"
        return f"deployment {self.deployment} (database {self.database})"


class DeploymentMismatch(ShardFailed):
    """An actor found under this deployment's name serves another deployment or database."""


def check_identities(
    identities: list[ShardIdentity],
    deployment: str | None,
    database: str | None,
    name_prefix: str,
    *,
    first_shard: int = 0,
) -> None:
    """Refuse identities of another shard layout or, given ``deployment``, of another
    deployment or database (``identities[n]`` is that of the actor of shard
    ``first_shard + n``).

    A durable deployment's actors serve what the partition map gives them, so
    only their shard number counts there: one added by ``slotengine cluster
    scale`` was created knowing more shards than the first ones. In-memory
    actors serve partition ``n`` of their shard count, which must agree."""
    for shard, identity in enumerate(identities, start=first_shard):
        layout_differs = deployment is None and identity.shard_count != len(identities)
        if identity.shard_id != shard or layout_differs:
            raise ShardFailed(
                f"actor for shard {shard} serves shard {identity.shard_id} of "
                f"{identity.shard_count}, expected {shard} of {len(identities)}"
            )
        if deployment is not None and (identity.deployment, identity.database) != (
            deployment,
            database,
        ):
            raise DeploymentMismatch(
                f"the shard actor {actor_name(shard, name_prefix)} serves {identity.serves()},"
                f" not this start's deployment {deployment} (database {database}):"
                " another deployment's actor under this deployment's name;"
                " `slotengine cluster reset` removes it"
            )
