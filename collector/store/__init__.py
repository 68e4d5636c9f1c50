"""The store: SQLite under --data-dir, written by one thread."""
