"""The last line of defence for the manifest's secrets: text about a host passes through a Redactor.

The manifest refuses a header value that HTTP would refuse, and no message of ours quotes one; but a host's
errors are also made of text we do not write (the HTTP library's, a proxy's echo of a rejected token). So
every message that becomes a report row, a JSON field or the final error line is redacted on its way there,
with every header value of every target, and the registry's password, replaced by `***`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Manifest

REDACTED = "***"
# A value shorter than this ('1', 'yes') is no secret worth the cost: redacting it would garble every message
# that holds those characters (an HTTP status, a tag name).
MIN_SECRET = 4
# A word of a multi-word value ('Bearer <token>') is redacted on its own when it is at least this long: a
# server may echo the token without its scheme word, and a short word ('Bearer', 'Basic') is not a secret.
MIN_SECRET_WORD = 8


class Redactor:
    """Replaces every form in which a secret may appear in a message: as is, stripped, escaped, or its words."""

    def __init__(self, secrets: Iterable[str]):
        needles: set[str] = set()
        for secret in secrets:
            # repr()'s escaping is how Python libraries quote a value with a newline or a non-ASCII character.
            needles.update({secret, secret.strip(), repr(secret)[1:-1], ascii(secret)[1:-1]})
            needles.update(word for word in secret.split() if len(word) >= MIN_SECRET_WORD)
        needles = {needle for needle in needles if len(needle) >= MIN_SECRET}
        # Longest first, so a value is replaced whole before any of its words.
        self._needles = sorted(needles, key=len, reverse=True)

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> Redactor:
        secrets = [value.get_secret_value() for target in manifest.targets for value in target.headers.values()]
        registry = manifest.distribution.registry
        if registry is not None and registry.auth is not None:  # the password, and the Basic header made of it
            password = registry.auth.password.get_secret_value()
            secrets += [password, base64.b64encode(f"{registry.auth.username}:{password}".encode()).decode()]
        return cls(secrets)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            text = text.replace(needle, REDACTED)
        return text

    def all(self, texts: Iterable[str]) -> list[str]:
        return [self(text) for text in texts]
