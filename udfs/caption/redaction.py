"""The API key kept out of error texts: a server may echo the request's ``Authorization`` header
in its error body, and those texts are stored (``descriptions.error``), logged and raised, where
docs/CAPTION_SERVERS.md promises only the key's variable name appears."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

REDACTED = "[redacted]"
# RFC 6750's b64token, what follows "Bearer " in an Authorization header: a token the server
# echoes is removed even when it is not the configured key.
BEARER = re.compile(r"Bearer\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)


def secret_forms(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The key an ``Authorization: Bearer`` header carries, as sent and JSON-escaped (a JSON body
    escapes quotes and backslashes, and non-ASCII characters unless the server turns that off)."""
    key = headers.get("Authorization", "").removeprefix("Bearer ")
    escaped = json.dumps(key)[1:-1]
    # JSON may also escape "/" as "\/" (PHP's and some Java encoders' default).
    forms = {key, escaped, escaped.replace("/", "\\/"), json.dumps(key, ensure_ascii=False)[1:-1]} - {""}
    # Longest first, so that a form holding another one is removed whole.
    return tuple(sorted(forms, key=len, reverse=True))


def without_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``[redacted]``: applied to every body, a
    caption's too, before any of it is cut (a cut could leave a prefix that no longer matches)."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(text: str, secrets: Iterable[str]) -> str:
    """An error text without ``secrets`` and without anything that looks like a bearer token.
    Only error texts get the pattern: in a caption "the ring bearer walks" is prose."""
    return BEARER.sub(f"Bearer {REDACTED}", without_secrets(text, secrets))
