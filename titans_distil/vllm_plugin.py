"""vLLM plugin (entry point `vllm.general_plugins`): vLLM calls `register()` in every process it starts, so an
exported MAC folder is served by plain `vllm serve DIR --trust-remote-code` and `vllm.LLM(DIR, trust_remote_code=True)`.

What vLLM can serve of a MAC model (one segment, frozen memory) is checked when vLLM builds its config, before
any weight is loaded: a checkpoint asking for more is refused with a message, and `max_model_len` defaults to
`segment_len` instead of the model's position limit.
"""

ARCHITECTURE = "MACLlamaForCausalLM"


def register() -> None:
    """Idempotent (vLLM may call it several times per process)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"titans_distil.models.vllm_mac_llama:{ARCHITECTURE}")

    class MACLlamaServingConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from titans_distil.models.vllm_mac_llama import check_servable

            model_config = vllm_config.model_config
            requested = model_config.original_max_model_len
            check_servable(model_config.hf_config, requested if requested not in (None, -1) else None)
            model_config.max_model_len = min(model_config.max_model_len, model_config.hf_config.segment_len)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, MACLlamaServingConfig)
