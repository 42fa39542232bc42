"""API keys: issue (shown once), digest storage, rotation, scopes, limits, cached verification."""
