"""Errors that name the bad file/field and what would be valid — one message, no traceback soup."""
from __future__ import annotations

from collections.abc import Iterable


class TqConfigError(ValueError):
    """Base class: every tqconfig error is a ValueError with a single, complete message."""


class ProfileError(TqConfigError):
    def __init__(self, path: str, field: str, problem: str):
        self.path, self.field, self.problem = path, field, problem
        super().__init__(f"{path}: field '{field}': {problem}")


class UnknownProfile(TqConfigError):
    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid) or '(none)'}")


class KvCacheDtypeRefused(TqConfigError):
    def __init__(self, hardware: str, kv_cache_dtype: str, why: str, supported: Iterable[str]):
        self.hardware, self.kv_cache_dtype = hardware, kv_cache_dtype
        super().__init__(
            f"kv_cache_dtype {kv_cache_dtype!r} is refused on {hardware}: {why}. "
            f"Valid on {hardware}: {', '.join(supported)}"
        )


class PlanInputError(TqConfigError):
    def __init__(self, field: str, value: object, valid: str):
        super().__init__(f"field '{field}' = {value!r} is invalid; expected {valid}")
