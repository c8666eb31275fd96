"""Build training data from git history: repositories, declarations, function-level changes, LLM-written tasks
and reasoning, fill-in-the-middle samples and input/output pairs (a Hugging Face dataset).

python build_dataset.py --help
"""

from titans_distil.dataset_build.cli import build_dataset

if __name__ == "__main__":
    build_dataset()
