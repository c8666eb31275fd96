"""Export a MAC (Titans memory) student as a trust_remote_code Hugging Face folder, optionally pushed to the
Hub.

python export_mac_model.py --run runs/demo [--checkpoint latest] [--output DIR] [--push-to-hub OWNER/NAME]
"""

from titans_distil.export_cli import export_mac

if __name__ == "__main__":
    export_mac()
