"""Certificate checks of the configuration: dates and names.

Pure functions of the certificates and the time; the loader
(`sbg.config.reader`) reads the files and puts each message under its key
path, so `sbg check-config`, a start and a reload say the same.

- A *chain* file (an inbound `tls.certificate`, `outbound.ca.certificate`):
  its first certificate expired is an error; a later one (an intermediate)
  expired is a warning, since clients that build the chain through it
  refuse it; any of them expiring within `EXPIRY_WARNING_DAYS` is a warning.
- A *bundle* of trusted CAs (`upstream_ca`, `tls_ca`): every certificate
  expired is an error (nothing is trusted any more); some expired is a
  warning; a warning too when every one still valid expires within
  `EXPIRY_WARNING_DAYS`.
- A certificate not valid yet is a warning (a clock or issuance problem).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from sbg.hosts import normalise_name

EXPIRY_WARNING_DAYS = 30


def not_valid_before(cert: x509.Certificate) -> datetime.datetime:
    """`cert`'s notBefore as an aware UTC datetime (any cryptography version)."""
    value = getattr(cert, "not_valid_before_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    return cert.not_valid_before.replace(tzinfo=datetime.UTC)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """`cert`'s notAfter as an aware UTC datetime (any cryptography version)."""
    value = getattr(cert, "not_valid_after_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def covers(cert: x509.Certificate, name: str) -> bool:
    """Whether CERT's subject alternative names include NAME (a name as
    `normalise_name` gives it; `*.` wildcards cover one label)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return False
    assert isinstance(san, x509.SubjectAlternativeName)
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    for pattern in (p.lower().rstrip(".") for p in san.get_values_for_type(x509.DNSName)):
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _when(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _which(file: str, certs: Sequence[x509.Certificate], index: int) -> str:
    """FILE, and `: certificate 2 (CN=...)` when it holds several."""
    if len(certs) == 1:
        return file
    names = certs[index].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = f" (CN={names[0].value!s})" if names else ""
    return f"{file}: certificate {index + 1}{cn}"


def _days(delta: datetime.timedelta) -> str:
    days = round(delta.total_seconds() / 86400)
    return "less than a day" if days < 1 else f"{days} day{'s' if days != 1 else ''}"


def validity(
    file: str,
    certs: Sequence[x509.Certificate],
    now: datetime.datetime,
    *,
    bundle: bool,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the dates of FILE's certificates at NOW."""
    errors: list[str] = []
    warnings: list[str] = []
    soon = now + datetime.timedelta(days=EXPIRY_WARNING_DAYS)
    expired = [i for i, c in enumerate(certs) if not_valid_after(c) <= now]
    for i, cert in enumerate(certs):
        start = not_valid_before(cert)
        if start > now:
            warnings.append(f"{_which(file, certs, i)} is not valid before {_when(start)}")
    if bundle:
        valid = [i for i in range(len(certs)) if i not in expired]
        for i in expired:
            line = f"{_which(file, certs, i)} expired on {_when(not_valid_after(certs[i]))}"
            (warnings if valid else errors).append(line)
        if valid and all(not_valid_after(certs[i]) <= soon for i in valid):
            last = max(not_valid_after(certs[i]) for i in valid)
            what = _which(file, certs, valid[0]) if len(valid) == 1 else f"{file}: every CA"
            warnings.append(f"{what} expires by {_when(last)}, in {_days(last - now)}")
        return errors, warnings
    for i, cert in enumerate(certs):
        end = not_valid_after(cert)
        if i in expired:
            line = f"{_which(file, certs, i)} expired on {_when(end)}"
            if i == 0:
                errors.append(line)
            else:
                warnings.append(line + ": clients that build the chain through it refuse it")
        elif end <= soon:
            warnings.append(
                f"{_which(file, certs, i)} expires on {_when(end)}, in {_days(end - now)}"
            )
    return errors, warnings


def uncovered(cert: x509.Certificate, hosts: Sequence[str]) -> list[str]:
    """The host names (or IP literals) of HOSTS that CERT is not valid for."""
    return [h for h in hosts if not covers(cert, normalise_name(h))]


def names_of(cert: x509.Certificate) -> list[str]:
    """CERT's subject alternative names (DNS names and IP addresses)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names
