"""The three ways bad input ends (SPEC §9): refuse the run, fail one shard, or skip a sample."""


class MmcurateError(Exception):
    """Base class; its message is one line meant for the user."""


class UsageError(MmcurateError):
    """Refuse before any work starts: bad spec, unknown preset, bad fraction, missing file."""


class ShardError(MmcurateError):
    """Fail one shard (work item) with a clear reason; the other shards go on."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command: stop, keep what is finished, exit 128 + signal.

    A BaseException like KeyboardInterrupt, so no `except Exception` in a stage swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = int(signum)
