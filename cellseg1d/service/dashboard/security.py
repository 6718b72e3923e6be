"""Who may look, and which files may be read: the dashboard's token and path containment.

The dashboard is read-only. Bound to loopback it is open to local users
unless a token is set; bound to any other address it refuses to start
without one (``dashboard.token`` or ``CELLSEG1D_DASHBOARD_TOKEN``). Files it
reads are the images and label images named by the catalog, and only when
their real path (links followed) lies inside a watched folder or a mirror
folder of the config; its own cache lies in the state dir.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cellseg1d.config import DASHBOARD_TOKEN_ENV, DASHBOARD_TOKEN_MIN, Config
from cellseg1d.errors import ConfigError

#: Cookie holding the token once a browser gave it as ``?token=``.
COOKIE = "cellseg1d_dashboard"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address only."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def resolve_token(config: Config, host: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The token the dashboard requires (None: open), or :class:`ConfigError` when one is missing.

    ``dashboard.token`` wins over ``CELLSEG1D_DASHBOARD_TOKEN``. Bound beyond loopback, a token is required.
    """
    env = os.environ if environ is None else environ
    token = config.dashboard.token or (env.get(DASHBOARD_TOKEN_ENV) or "").strip() or None
    if token is not None and len(token) < DASHBOARD_TOKEN_MIN:
        raise ConfigError(f"{DASHBOARD_TOKEN_ENV}: the token must have at least {DASHBOARD_TOKEN_MIN} characters")
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"setting dashboard.address: {host} is reachable beyond this machine, so the dashboard needs a token: "
            f"set dashboard.token or the environment variable {DASHBOARD_TOKEN_ENV} (e.g. 'openssl rand -hex 16'), "
            "or bind loopback only (a bare port)")
    return token


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def allowed_roots(config: Config) -> list[Path]:
    """Real paths of the folders whose files the dashboard may read: watched folders and mirror folders."""
    roots: list[Path] = []
    for root in config.watch.roots:
        for folder in (root.path, root.mirror_root):
            if folder is not None:
                real = Path(os.path.realpath(folder))
                if real not in roots:
                    roots.append(real)
    return roots


def contained(path: str | Path, roots: Iterable[Path]) -> Path | None:
    """The real path of ``path`` (links followed) when it lies inside one of ``roots``, else None.

    Relative paths, ``..`` parts and NUL bytes are refused before anything touches the filesystem.
    """
    text = str(path)
    if not text or "\x00" in text or not os.path.isabs(text) or ".." in Path(text).parts:
        return None
    real = Path(os.path.realpath(text))
    for root in roots:
        if real == root or root in real.parents:
            return real
    return None
