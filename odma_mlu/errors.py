"""Error types shared across the package.

Three tiers (DESIGN.md): ``None`` means "no room now"; these exceptions mean bad input or
configuration and always carry the offending numbers and the fix; ``assert`` guards
internal invariants only.
"""


class OdmaError(Exception):
    """Base class for user-facing errors."""


class ConfigError(OdmaError, ValueError):
    """A configuration file or value is invalid."""


class ProfileError(ConfigError):
    """A device profile file is malformed."""


class BackendUnavailable(OdmaError, RuntimeError):
    """The requested backend cannot run on this machine."""


class RequestRejected(OdmaError, ValueError):
    """A request can never be served as asked (too long, bad parameters)."""


class DataFormatError(OdmaError, ValueError):
    """A data or trace file does not have the expected format."""
