"""Leuko: decision support for acute leukemia screening from blood smear microscopy."""

__version__ = "0.1.0"
