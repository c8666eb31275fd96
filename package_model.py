"""InferenceMemoryWrapper packages — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("package_model.py", "the export issue: InferenceMemoryWrapper packages")()
