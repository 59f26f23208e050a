"""Peer engines: their environments, builds and versions."""
