"""Evaluate model folders: held-out perplexity by position and long-range recall, memory on and off.

python evaluate.py MODEL... --help
"""

from titans_distil.evaluate import evaluate_command

if __name__ == "__main__":
    evaluate_command()
