"""End-to-end tests: real Synapse homeservers (and sbg) on loopback addresses.

Run ``scripts/install-synapse`` first; without ``.venv-synapse`` the tests are
skipped, unless ``SBG_E2E_REQUIRED=1`` is set, in which case they fail.
"""
