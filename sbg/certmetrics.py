"""Certificate expiry as a metric, so an operator can alert before it happens.

`sbg_certificate_expiry_timestamp_seconds{kind,name,path}` holds the
notAfter (Unix time) of every certificate file the configuration names; for
a file with several certificates (a chain, a CA bundle) the earliest one,
the moment the file stops being fully usable. Label values come from the
configuration only.

Kinds:
    `inbound_tls`: an internal homeserver's `tls.certificate` (name: its
        server name), served to external servers.
    `upstream_ca`: an internal homeserver's `upstream_ca` (name: its server
        name).
    `tls_ca`: an external homeserver's pinned `tls_ca` (name: its server
        name).
    `outbound_ca`: the interception CA, `outbound.ca.certificate` (name:
        `outbound`).
"""

from __future__ import annotations

import logging

from sbg.config.model import Config
from sbg.metrics import Metrics
from sbg.tls.pem import PemError, certificate_expiry

logger = logging.getLogger(__name__)

# (kind, name, path)
CertificateRef = tuple[str, str, str]


def configured_certificates(config: Config) -> list[CertificateRef]:
    """Every certificate file `config` names, as (kind, name, path)."""
    refs: list[CertificateRef] = []
    for hs in config.internal_homeservers:
        if hs.tls is not None:
            refs.append(("inbound_tls", hs.server_name, hs.tls.certificate))
        if hs.upstream_ca is not None:
            refs.append(("upstream_ca", hs.server_name, hs.upstream_ca))
    for ext in config.external_homeservers:
        if ext.tls_ca is not None:
            refs.append(("tls_ca", ext.server_name, ext.tls_ca))
    if config.outbound.ca is not None:
        refs.append(("outbound_ca", "outbound", config.outbound.ca.certificate))
    return refs


def update_certificate_expiry(config: Config, metrics: Metrics) -> None:
    """Set the expiry gauge for `config`'s certificates, dropping every other series.

    Called at start and after each successful reload, so a certificate
    removed from the configuration (or a renamed server) leaves no stale
    series behind. A file that cannot be read or parsed is logged and gets no
    series: the alert on a missing series (`absent()`) covers it.
    """
    gauge = metrics.cert_expiry
    gauge.clear()
    for kind, name, path in configured_certificates(config):
        try:
            expiry = certificate_expiry(path)
        except PemError as e:
            logger.warning("certificate expiry metric: %s", e)
            continue
        gauge.labels(kind, name, path).set(expiry.timestamp())
