"""Backends for differential testing: each runs a machine snapshot and reports an outcome."""
