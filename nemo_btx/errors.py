"""Error types the command line turns into one clear line instead of a traceback."""


class BtxError(Exception):
    """Base of every error a user can cause and fix (bad config, bad input, bad checkpoint)."""


class ConfigError(BtxError, ValueError):
    """A configuration value is unknown, mistyped or impossible.

    The message always names the dotted key, the value given and what is allowed, because a
    user reading a Slurm log has nothing else to go on.
    """

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses a process boundary (a data worker's error comes
        # back to the pool pickled; from the message alone it could not be rebuilt, and the
        # pool's result thread would die and hang the stage).
        return type(self), (self.key, self.value, self.allowed)


class CheckpointError(BtxError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class NotImplementedStageError(BtxError):
    """A stage listed by the CLI whose implementation has not landed yet."""
