"""Shared fixtures. Server fixtures live in tests/servers.py."""
