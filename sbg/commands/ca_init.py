"""`sbg ca init DIR`: create the outbound interception CA."""

from __future__ import annotations

from typing import TextIO

from sbg.tls.ca import CAError, init_ca


def run(directory: str, out: TextIO, err: TextIO) -> int:
    """Create DIR/ca.crt and DIR/ca.key; 0 on success, 1 with one error line."""
    try:
        cert_path, key_path = init_ca(directory)
    except CAError as e:
        err.write(f"sbg ca init: {e}\n")
        return 1
    out.write(
        f"created the interception CA:\n"
        f"  certificate: {cert_path}\n"
        f"  private key: {key_path} (mode 0600: keep it secret)\n"
        f"next steps:\n"
        f"  - on every internal Synapse, trust the certificate for federation:\n"
        f"      federation_custom_ca_list:\n"
        f"        - {cert_path}\n"
        f"  - in sbg.yaml:\n"
        f"      outbound:\n"
        f"        ca:\n"
        f"          certificate: {cert_path}\n"
        f"          private_key: {key_path}\n"
    )
    return 0
