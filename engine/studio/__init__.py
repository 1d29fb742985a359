"""Studio: accounts (salted scrypt hashes, normalised names, lockout), quotas and credits with an append-only
ledger, for a studio that shares one Stylebooth; service.py puts them together for the app and the command line
(every admin operation checks the caller's role).

Owns: the `users`, `quota_*` and `ledger` tables of <data_dir>/stylebooth.db.
May import: engine.core.
"""
