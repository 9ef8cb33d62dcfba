"""Bearer-token authentication: a token file maps tokens to tenants.

The file holds one ``TOKEN TENANT`` pair per line (``#`` starts a comment). Without a file the
server is open and every caller is the tenant ``"default"``.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from metaprune.errors import MetaPruneError

OPEN_TENANT = "default"


class TokenFileError(MetaPruneError):
    """The --tokens file is malformed."""


class Authenticator:
    """Resolves the ``authorization`` metadata of a call to a tenant name.

    Example::

        auth = Authenticator.from_file(Path("tokens.txt"))   # "s3cret alice" per line
        auth.tenant_for([("authorization", "Bearer s3cret")])  # -> "alice"
    """

    def __init__(self, tokens: dict[str, str] | None):
        # token -> tenant; None means an open server
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path | None) -> "Authenticator":
        if path is None:
            return cls(None)
        tokens: dict[str, str] = {}
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise TokenFileError(f"cannot read the token file {path}: {error}") from error
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(f"{path}:{number}: expected 'TOKEN TENANT', got {len(parts)} fields")
            tokens[parts[0]] = parts[1]
        if not tokens:
            raise TokenFileError(f"the token file {path} holds no token")
        return cls(tokens)

    @property
    def required(self) -> bool:
        return self._tokens is not None

    def tenant_for(self, metadata) -> str | None:
        """The caller's tenant, or None when the token is missing or wrong."""
        if self._tokens is None:
            return OPEN_TENANT
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        offered = header[len("Bearer "):].strip().encode()
        tenant = None
        for token, owner in self._tokens.items():
            # compare against every token, in constant time, so timing reveals nothing
            if hmac.compare_digest(offered, token.encode()):
                tenant = owner
        return tenant
