"""Package any Llama (Hub id, local folder, .gguf, the embedded teacher) with an inference-time memory, as a
trust_remote_code folder for plain transformers.

    python package_model.py --help
"""

from titans_distil.package import package

if __name__ == "__main__":
    package()
