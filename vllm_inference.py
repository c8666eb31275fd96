"""Generate with vLLM (batched) or serve the model with vLLM's OpenAI-compatible server.

python vllm_inference.py --model-path DIR [--use-mac] --prompt TEXT [--prompt TEXT ...] [--prompts-file FILE]
python vllm_inference.py --model-path DIR --serve [--port 8000] [-- extra vllm serve arguments]
"""

from titans_distil.serving import vllm_inference

if __name__ == "__main__":  # vLLM's engine runs in spawned processes that re-import this module
    vllm_inference()
