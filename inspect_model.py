"""Inspect weights, runs and exports, and verify exports:

python inspect_model.py weights|architecture|verify|tokenizers|compare|examples --help
"""

from titans_distil.inspect_cli import inspect_model

if __name__ == "__main__":
    inspect_model()
