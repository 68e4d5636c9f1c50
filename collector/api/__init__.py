"""What people read: the HTTP JSON API, the trace export, the dashboard page and the query CLI."""
