"""Usage ledger, audit trail, statistics."""
