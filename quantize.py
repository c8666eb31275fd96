"""bitsandbytes 8-bit and 4-bit — not yet available."""

from titans_distil.cli import not_yet

if __name__ == "__main__":
    not_yet("quantize.py", "the quantization issue: bitsandbytes 8-bit and 4-bit")()
