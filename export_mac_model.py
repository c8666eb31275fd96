"""Hugging Face trust_remote_code export of MAC students — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("export_mac_model.py", "the export issue: Hugging Face trust_remote_code export of MAC students")()
