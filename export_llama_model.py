"""Export a student without memory as a plain LlamaForCausalLM folder (stock transformers / vLLM), optionally
pushed to the Hub.

    python export_llama_model.py --run runs/plain [--checkpoint latest] [--output DIR] [--push-to-hub
    OWNER/NAME]
"""

from titans_distil.export_cli import export_llama

if __name__ == "__main__":
    export_llama()
