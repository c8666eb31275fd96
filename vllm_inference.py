"""vLLM plugin and offline inference — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("vllm_inference.py", "the serving issue: vLLM plugin and offline inference")()
