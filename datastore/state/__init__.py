"""Persisted state behind one interface: transfers, files, leases, the event log (and the SQLite
backend of it)."""
