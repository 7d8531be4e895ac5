"""API keys: where they come from, which tenant each one is, and the constant-time lookup.

Keys come from ``--api-key-file`` (one ``key [tenant] [weight]`` per line; ``#`` starts a comment),
from ``LLM_BATCHER_API_KEY``, or from ``--api-key`` (which ``ps`` shows: prefer the other two).
A key without a tenant is the ``default`` tenant; a weight (default 1) is for the weighted fair
queuing planned in the batcher. An empty key is an error, never "no auth".

The ring stores SHA-256 digests, not keys, and looks a presented token up by its digest: the time
a lookup takes says nothing about how much of a key was right.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batcher import InvalidRequest

__all__ = ["DEFAULT_TENANT", "ApiKey", "KeyRing", "parse_key_file"]

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key, the tenant it speaks for, and that tenant's weight."""

    key: str
    tenant: str = DEFAULT_TENANT
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.key or self.key != self.key.strip() or any(c.isspace() for c in self.key):
            raise InvalidRequest(
                "an API key must be non-empty and hold no whitespace: an empty key would "
                "disable auth; leave the key unset to serve without one",
                field="api_key",
            )
        if not _TENANT.fullmatch(self.tenant):
            raise InvalidRequest(
                f"tenant {self.tenant!r}: use 1 to 64 letters, digits, '_', '.' or '-'", field="tenant"
            )
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise InvalidRequest(f"weight must be a positive number, got {self.weight}", field="weight")

    def __repr__(self) -> str:  # never print a key
        return f"ApiKey(tenant={self.tenant!r}, weight={self.weight:g})"


class KeyRing:
    """The accepted keys, by digest. Empty: the server needs no key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        for k in keys:
            digest = _digest(k.key.encode())
            if digest in self._by_digest:
                raise InvalidRequest(
                    f"the same API key is listed twice (tenant {k.tenant!r})", field="api_key"
                )
            self._by_digest[digest] = k

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def find(self, token: bytes | None) -> ApiKey | None:
        """The key ``token`` is, or None."""
        return None if not token else self._by_digest.get(_digest(token))


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def parse_key_file(path: str | Path) -> list[ApiKey]:
    """The keys of a key file: ``key [tenant] [weight]`` per line, ``#`` comments, blank lines."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidRequest(
            f"cannot read the API key file {path}: {e.strerror}", field="api_key_file"
        ) from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 3:
            raise InvalidRequest(f"{path}:{n}: expected 'key [tenant] [weight]'", field="api_key_file")
        try:
            weight = float(words[2]) if len(words) == 3 else 1.0
            keys.append(ApiKey(words[0], words[1] if len(words) > 1 else DEFAULT_TENANT, weight))
        except (ValueError, InvalidRequest) as e:
            raise InvalidRequest(f"{path}:{n}: {e}", field="api_key_file") from None
    if not keys:
        raise InvalidRequest(
            f"{path} holds no API key: add 'key [tenant] [weight]' lines", field="api_key_file"
        )
    return keys
