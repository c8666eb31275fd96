"""vLLM plugin (entry point `vllm.general_plugins`): vLLM calls `register()` in every process it starts, so an
exported MAC folder is served by plain `vllm serve DIR --trust-remote-code` and `vllm.LLM(DIR,
trust_remote_code=True)`.

When vLLM builds its config (before any weight is loaded) `vllm_mac_llama.configure` checks the checkpoint
and, for a memory that learns per request, makes the model hybrid (per-request state pages) and turns prefix
caching off.
"""

ARCHITECTURE = "MACLlamaForCausalLM"


def register() -> None:
    """Idempotent (vLLM may call it several times per process)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"titans_distil.vllm_mac_llama:{ARCHITECTURE}")

    class MACLlamaServingConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from titans_distil.vllm_mac_llama import configure

            configure(vllm_config)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, MACLlamaServingConfig)
