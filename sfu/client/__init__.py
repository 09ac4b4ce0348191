"""Blindfold's Python client (bots, tests, load generation); never imported by the server."""
