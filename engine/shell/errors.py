"""Failures of the shell, as the coalescer and the gateway see them.

Transports map their own exceptions (Ray's, asyncio's) onto these once, at the
adapter boundary, so nothing above a transport imports Ray to handle a failure.
Business refusals never appear here: they are ``protocol.Failure`` results.

Whether a failed batch may have been applied all the same is part of each
failure's meaning (``may_have_applied``): a batch that left and got no answer
may have been applied and committed; one that never reached its shard, or was
refused before it ran, was not.
"""


class ShellError(Exception):
    """A batch could not be carried to its shard or back."""


class ShardUnavailable(ShellError):
    """The shard's owner died or is restarting; the batch may or may not have been applied.

    Resending the same batch is safe: the shard deduplicates by request id.
    """


class ShardUnreachable(ShardUnavailable):
    """The batch never reached its shard (no connection, the shard still starting): nothing
    was applied."""


class ShardBusy(ShellError):
    """The shard refused the call for backpressure before applying anything; retry later."""


class ShardCallTimeout(ShellError):
    """No answer within the limit; the batch may or may not have been applied."""


class ShardFailed(ShellError):
    """The shard cannot serve: it hit a broken invariant, or refused a malformed batch."""


class BatchRejected(ShardFailed):
    """The batch was malformed or too large; nothing was applied."""


class Overloaded(ShellError):
    """Too many commands wait for one shard on the caller's side; nothing was sent."""


def may_have_applied(error: ShellError) -> bool:
    """Whether the batch that failed with ``error`` may have been applied: it reached
    its shard (or may have) and no answer came back."""
    return isinstance(error, ShardUnavailable | ShardCallTimeout) and not isinstance(
        error, ShardUnreachable
    )
