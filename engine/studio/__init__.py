"""Studio: accounts (salted scrypt hashes, normalised names, lockout), quotas and credits with an append-only
ledger, for a studio that shares one Stylebooth.

Owns: the `users`, `quota_*` and `ledger` tables of <data_dir>/stylebooth.db.
May import: engine.core.
"""
