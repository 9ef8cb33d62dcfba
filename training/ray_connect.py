"""Joining a Ray cluster: token authentication, and one clear line when joining fails.

A cluster started with ``ray start --head`` on a machine that holds a Ray token
(``~/.ray/auth_token``, which a local ``ray.init()`` of a recent Ray creates) runs with
token authentication. `ray start` turns token mode on by itself when it finds a token; ``ray.init
(address=...)`` does not, so a driver without ``RAY_AUTH_MODE=token`` is refused
(``InvalidAuthToken``, ~20 warning lines, then a bare ``ConnectionError`` after 20 s).
`connect_ray` does what `ray start` does — token mode on whenever a token is available and the
mode is not set explicitly — and turns a refusal into one line that says how to give the token:

- ``RAY_AUTH_TOKEN``: the token itself;
- ``RAY_AUTH_TOKEN_PATH``: a file holding it;
- ``~/.ray/auth_token``: the default file (``ray get-auth-token`` on the head node prints it).

``RAY_AUTH_MODE=disabled`` opts out. `serving` reuses this for ``metaprune serve
--ray-address``.

Example::

    from metaprune.training.ray_connect import connect_ray
    connect_ray("127.0.0.1:6379")       # or RayConnectError: cannot join ... (one line)
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from metaprune.errors import MetaPruneError

import ray  # loopback-only: metaprune.training set Ray's switch when it loaded

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
_REFUSED_MARKERS = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError")


class RayConnectError(MetaPruneError):
    """Joining a Ray cluster failed; the message is one line saying why and what to do."""


def token_source() -> str | None:
    """Where a Ray authentication token is available to this process (None: nowhere)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH ({path})" if Path(path).is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def enable_token_auth_if_available() -> bool:
    """Token mode on when a token is available and RAY_AUTH_MODE is unset (as `ray start`)."""
    if os.environ.get(AUTH_MODE) is not None:
        return os.environ[AUTH_MODE].lower() == "token"
    if token_source() is None:
        return False
    os.environ[AUTH_MODE] = "token"
    # Ray read its configuration when it was imported: make it read the mode again.
    from ray._raylet import Config

    Config.initialize("")
    return True


@contextlib.contextmanager
def _captured_stderr():
    """Everything written to file descriptor 2 (Ray's C++ core logs there) goes to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _refusal_line(address: str, log: str, error: Exception) -> str:
    if any(marker in log or marker in str(error) for marker in _REFUSED_MARKERS):
        given = token_source()
        mode = os.environ.get(AUTH_MODE, "unset")
        return (f"cannot join the Ray cluster at {address}: it refused this process's "
                f"authentication (token {'from ' + given if given else 'not found'}, "
                f"RAY_AUTH_MODE {mode}); the cluster uses token authentication: give its "
                f"token in {', '.join(TOKEN_SOURCES[:2])} or {TOKEN_SOURCES[2]} "
                "(`ray get-auth-token` on the head node prints it)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot join the Ray cluster at {address}: {first}"


def connect_ray(address: str, **init_options) -> None:
    """``ray.init(address=address)`` with token auth when a token is available.

    Raises:
        RayConnectError: one line — the cluster refused the token (and how to give it), or
            nothing answered at `address`.
    """
    enable_token_auth_if_available()
    with _captured_stderr() as log:
        try:
            ray.init(address=address, configure_logging=False, **init_options)
            failure = None
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
            failure = error
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    if failure is not None:
        raise RayConnectError(_refusal_line(address, text, failure)) from None
    sys.stderr.write(text)  # a joined cluster's own messages still reach the user
