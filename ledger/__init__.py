"""ledger: receipts, hash-chained bilateral blocks, SQLite store, sync (future issues)."""
