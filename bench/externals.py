"""Extra configured external homeservers (`--externals N`).

They only enlarge sbg's configuration, so that the per-request cost with
1 and with 1,000 configured servers can be compared; the load still comes
from the real partner.
"""

from __future__ import annotations

from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key


def server_name(index: int) -> str:
    """The INDEXth extra server's name: `ext0001.example`, ..."""
    return f"ext{index:04d}.example"


def extra_externals(count: int, tls_ca: str | None, trust_level: str) -> list[dict[str, Any]]:
    """COUNT enabled `external_homeservers` entries, numbered from 1.

    Each has its own server name and federation host and a freshly generated
    pinned ed25519 verify key (the signing key is thrown away).
    """
    out = []
    for index in range(1, count + 1):
        key = generate_signing_key(f"x{index}")
        name = server_name(index)
        out.append(
            {
                "server_name": name,
                "federation_hosts": [f"matrix.{name}"],
                "client_hosts": [],
                "verify_keys": {
                    f"ed25519:{key.version}": encode_verify_key_base64(get_verify_key(key))
                },
                "key_fetch": "pinned",
                "tls_ca": tls_ca,
                "addresses": {},
                "source_ips": [],
                "trust_level": trust_level,
                "enabled": True,
            }
        )
    return out
