"""vLLM plugin (entry point `vllm.general_plugins`): vLLM calls `register()` in every process it starts, so an
exported MAC folder is served by plain `vllm serve DIR --trust-remote-code` and `vllm.LLM(DIR, trust_remote_code=True)`.

What vLLM can serve of a MAC model (frozen memory) is checked when vLLM builds its config, before any weight is
loaded: a checkpoint asking for a learning memory is refused with a message.
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
            from titans_distil.vllm_mac_llama import check_servable

            check_servable(vllm_config.model_config.hf_config)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, MACLlamaServingConfig)
