"""Distil a Llama teacher into a smaller student, optionally with Titans neural memory (`--use-mac`).

python distil.py --help
"""

from titans_distil.cli import distil

if __name__ == "__main__":
    distil()
