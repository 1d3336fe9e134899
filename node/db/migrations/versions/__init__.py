"""Revisions of the node's schema (0001: the schema of the release before migrations)."""
