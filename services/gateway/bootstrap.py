"""The dev tenant's first API key: from the environment or a file, and a generated one shown once to the person
at the terminal, never written to the log (the log is a file others may read, or shipped elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from services.gateway.tenants import DEV_TENANT, KEY_PREFIX_LEN, generate_key

log = structlog.get_logger(__name__)

TTY = "/dev/tty"


def configured_key(key: str, key_file: str) -> str:
    """The bootstrap key: `key` (FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY), else the contents of key_file, else a
    key generated into key_file (created 0600) when it does not exist yet; "" when neither is set."""
    if key or not key_file:
        return key
    path = Path(key_file)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    created = generate_key()
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(created + "\n")
    log.info("gateway.bootstrap_key_file_written", path=str(path), key_prefix=created[:KEY_PREFIX_LEN])
    return created


def show_generated_key(key: str, tty: str = TTY) -> bool:
    """Print a generated dev key once to the controlling terminal (whatever stdout and stderr are redirected
    to); the log says only that it was shown, or, with no terminal, that it was shown nowhere and how to make
    another. True if it was shown."""
    try:
        with open(tty, "w") as out:  # noqa: PTH123 - a device, not a path we manage
            out.write(
                f"\nfleetserve gateway: created tenant '{DEV_TENANT}' with API key\n\n    {key}\n\n"
                "It is stored hashed only: this is the one time it is shown (not in the log).\n\n"
            )
    except OSError:
        log.warning(
            "gateway.dev_key_not_shown",
            tenant=DEV_TENANT,
            key_prefix=key[:KEY_PREFIX_LEN],
            reason="no terminal; the key is never logged",
            fix=f"fleetserve admin key create {DEV_TENANT} (or start with FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY "
            "or --bootstrap-api-key-file)",
        )
        return False
    log.info("gateway.dev_key_shown", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN], on="terminal")
    return True
