"""Type checks for settings that come from TOML, JSON and flags (model and training configs)."""


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
