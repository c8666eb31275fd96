"""plain LlamaForCausalLM export — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("export_llama_model.py", "the export issue: plain LlamaForCausalLM export")()
