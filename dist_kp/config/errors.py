"""The error of a configuration that cannot be used (its own module: every config module raises it)."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""
