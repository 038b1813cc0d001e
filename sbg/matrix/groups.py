"""The names of the endpoint groups (docs/endpoints.md).

Trust levels name these; `sbg.matrix.endpoints` assigns every endpoint to
exactly one of them.
"""

from __future__ import annotations

GROUPS: frozenset[str] = frozenset(
    {
        "discovery",
        "keys",
        "key_query",
        "transactions",
        "events",
        "joins",
        "leaves",
        "knocks",
        "invites",
        "third_party_invites",
        "public_rooms",
        "hierarchy",
        "queries_profile",
        "queries_directory",
        "queries_other",
        "openid",
        "devices",
        "e2ee",
        "media",
        "legacy_media",
        "policy",
    }
)
