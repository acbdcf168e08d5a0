"""Shared pytest configuration and fixtures."""

pytest_plugins = ["hub_server"]
