"""Command line: one module per command, registered by app.py."""
