"""Failures of the shell, as the coalescer and the gateway see them.

Transports map their own exceptions (Ray's, asyncio's) onto these once, at the
adapter boundary, so nothing above a transport imports Ray to handle a failure.
Business refusals never appear here: they are ``protocol.Failure`` results.
"""


class ShellError(Exception):
    """A batch could not be carried to its shard or back."""


class ShardUnavailable(ShellError):
    """The shard's owner died or is restarting; the batch may or may not have been applied.

    Resending the same batch is safe: the shard deduplicates by request id.
    """


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
