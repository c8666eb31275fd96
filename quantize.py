"""Quantize a teacher, a plain student or a MAC student with bitsandbytes (8-bit or 4-bit): `python
quantize.py --help`."""

from titans_distil.quantize import quantize_command

if __name__ == "__main__":
    quantize_command()
