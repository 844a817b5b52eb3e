"""The errors kakusan raises for a user's mistake. The CLI prints these as one line and exits non-zero."""


class KakusanError(Exception):
    """Base class: a problem the user can fix (bad input, config, file)."""


class ConfigError(KakusanError, ValueError):
    """A configuration value, name or combination is invalid."""


class DataError(KakusanError):
    """A data set is missing, empty, corrupt or of the wrong shape."""


class CheckpointError(KakusanError):
    """A checkpoint is missing, unreadable, not kakusan's, or does not match."""


def need(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``: the one-line checks of the config dataclasses."""
    if not ok:
        raise ConfigError(message)


def config_from_dict(cls, d: dict, what: str):
    """Build the config dataclass ``cls`` from ``d``, refusing keys it does not have (naming them)."""
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**d)
