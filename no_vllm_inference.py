"""Generate with transformers (no vLLM), carrying a per-user memory through prompts and generated tokens.

python no_vllm_inference.py --model-path DIR [--use-mac] --update-rule none|ema|surprise --prompt TEXT
                            [--interactive] [--memory-in FILE] [--memory-out FILE]
"""

from titans_distil.generate import no_vllm_inference

if __name__ == "__main__":
    no_vllm_inference()
