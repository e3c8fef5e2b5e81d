"""The one peer allowlist rule for every network way in (DICOM SCP, HL7 MLLP listener).

- An empty allowlist admits loopback peers only (127.0.0.0/8, ::1): fail closed.
- Otherwise only addresses inside one of the listed addresses or CIDR networks are admitted
  (loopback too must then be listed).
- An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is judged as its IPv4 address; an IPv6 zone
  (``fe80::1%eth0``) is ignored; anything that is not an IP address (a host name) is refused.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allowlist(entries: list[str]) -> list[str]:
    """Entries stripped and checked; `ValueError` names the first that is no address/network."""
    cleaned = [e.strip() for e in entries]
    for entry in cleaned:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(
                f"allowed_hosts entry {entry!r} is not an IP address or network: {exc}"
            ) from None
    return cleaned


def peer_refusal(address: str, allowlist: list[str]) -> str | None:
    """Why a peer at `address` is refused under `allowlist`, or None when it is admitted."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "address is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not allowlist:
        return None if ip.is_loopback else "not a loopback address and no allowed_hosts configured"
    for entry in allowlist:
        try:
            network: Network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue  # settings validate entries; a bad one admits nobody
        if ip in network:
            return None
    return "address not in allowed_hosts"


def peer_allowed(address: str, allowlist: list[str]) -> bool:
    """True when `peer_refusal` admits `address`."""
    return peer_refusal(address, allowlist) is None


def describe_allowlist(allowlist: list[str]) -> str:
    """One line for start-up logs: who may connect."""
    if not allowlist:
        return "loopback peers only (set allowed_hosts to open)"
    return "open beyond loopback to " + ", ".join(allowlist)
