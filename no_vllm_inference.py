"""transformers generation with memory updates — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("no_vllm_inference.py", "the serving issue: transformers generation with memory updates")()
