"""Distil a Llama teacher into a smaller student with Titans neural memory (Memory as Context)."""

__version__ = "0.1.0"
