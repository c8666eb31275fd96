"""MAC Llama model: exact Llama equivalence, segment locality, causality through the memory, cached generation
against full recomputation, gradients, save/load, per-call update rules, config validation. Tiny float32
models."""

import json

import pytest
import torch
import torch.nn.functional as F
from titans_distil.models.configuration_mac_llama import MACLlamaConfig
from titans_distil.models.modeling_mac_llama import MACCache, MACLlamaForCausalLM
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from titans_distil.model_folder import save_with_model_code

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
)
SEG, CHUNK = 16, 4
MAC_FIELDS = (
    "segment_len",
    "num_persistent_tokens",
    "memory_layers",
    "memory_chunk_size",
    "memory_depth",
    "memory_expansion",
    "memory_dim",
    "memory_max_lr",
    "update_rule",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def mac_model(seed=0, open_gates=True, **overrides):
    """A MAC model with memory in layers 1 and 3, 4 persistent tokens, 16-token segments, 4-token chunks.
    `open_gates` gives the read-out gates random non-zero values so the read-out path is exercised."""
    values = dict(
        BASE, segment_len=SEG, memory_chunk_size=CHUNK, num_persistent_tokens=4, memory_layers=[1, 3]
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = MACLlamaForCausalLM(MACLlamaConfig(**values)).eval()
    if open_gates:
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.memory_gate is not None:
                    layer.memory_gate.normal_(0.0, 1.0)
    return model


def tokens(batch, length, seed=1):
    return torch.randint(
        0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, use_cache=False, **kwargs).logits


# ------------------------------------------------------------------------------------------ Llama equivalence


@pytest.mark.parametrize("tied", [False, True])
def test_without_memory_and_one_segment_equals_llama(tied):
    mac = mac_model(memory_layers=[], num_persistent_tokens=0, segment_len=64, tie_word_embeddings=tied)
    values = {
        k: v for k, v in mac.config.to_dict().items() if k not in MAC_FIELDS + ("model_type", "architectures")
    }
    llama = LlamaForCausalLM(LlamaConfig(**values)).eval()
    missing, unexpected = llama.load_state_dict(mac.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = tokens(2, 50)
    with torch.no_grad():
        torch.testing.assert_close(logits(mac, ids), llama(ids).logits, rtol=0, atol=1e-5)


def test_llama_state_dict_loads_with_only_memory_parts_missing():
    llama = LlamaForCausalLM(LlamaConfig(**BASE))
    mac = mac_model()
    missing, unexpected = mac.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(
        ".memory." in n or n.endswith(("memory_gate", "persistent_tokens")) for n in missing
    )
    assert {n.split(".")[2] for n in missing} == {"1", "3"}


@pytest.mark.parametrize("version,gate", [(1, 0.0), (2, 0.01), (3, 0.2)])
def test_freshly_built_student_readout_gate(version, gate):
    """Versions 2 and 3 open the read-out gate slightly (memory parameters get gradients at once; in version 3
    the gate is the read-out's share of the attention output); version 1 starts closed."""
    mac = mac_model(open_gates=False, memory_version=version)
    for i in (1, 3):
        layer = mac.model.layers[i]
        assert torch.equal(layer.memory_gate, torch.full_like(layer.memory_gate, gate))
        assert 0 < layer.persistent_tokens.std() < 0.1
    assert mac.model.layers[0].memory is None and mac.model.layers[0].persistent_tokens is None


def test_version_3_scales_the_readout_to_the_attention_output():
    """Version 3 = version 2 with the read-out at y's RMS before the gate; same weights, so the versions
    differ only there; with the read-out zeroed (out_proj = 0) the two versions agree again (nothing else
    changed)."""
    from titans_distil.models.modeling_mac_llama import gated_readout

    readout, y = torch.randn(2, 5, 8) * 0.3, torch.randn(2, 5, 8) * 7.0
    gate = torch.full((8,), 0.05)
    assert torch.equal(gated_readout(gate, readout, y, 2), gate * readout)
    share = gated_readout(gate, readout, y, 3).pow(2).mean(-1).sqrt() / y.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(share, torch.full_like(share, 0.05), rtol=1e-4, atol=1e-6)

    ids = torch.randint(0, BASE["vocab_size"], (1, 40))
    v2, v3 = mac_model(memory_version=2), mac_model(memory_version=3)
    v3.load_state_dict(v2.state_dict())
    with torch.no_grad():
        assert not torch.allclose(v2(ids).logits, v3(ids).logits)
        for model in (v2, v3):
            for layer in model.model.layers:
                if layer.memory is not None:
                    layer.memory.out_proj.weight.zero_()
        torch.testing.assert_close(v2(ids).logits, v3(ids).logits)


def test_attention_module_alone_refuses_to_run():
    attn = mac_model().model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="call the decoder layer, not its self_attn"):
        attn(torch.zeros(1, 3, BASE["hidden_size"]), None, None)


def test_attention_is_segment_local():
    """Without memory, the second segment's logits are those of Llama run on that segment alone (same
    positions)."""
    mac = mac_model(memory_layers=[], num_persistent_tokens=0)
    llama = LlamaForCausalLM(LlamaConfig(**BASE)).eval()
    llama.load_state_dict(mac.state_dict(), strict=False)
    ids = tokens(2, 40)
    full = logits(mac, ids)
    with torch.no_grad():
        alone = llama(ids[:, SEG : 2 * SEG], position_ids=torch.arange(SEG, 2 * SEG)[None]).logits
    torch.testing.assert_close(full[:, SEG : 2 * SEG], alone, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ the MAC layer


def reference_memory_layer(layer, hidden, rule):
    """The MAC layer written out segment by segment with Llama's own attention over the explicit context
    [persistent ‖ h ‖ x] (positions: segment start for persistent tokens, token j's for h_j and x_j); version
    3 (the default): the read-out at y's RMS (per token) before the gate."""

    def unit(t):
        return F.rms_norm(t, (t.shape[-1],), eps=1e-6)

    x = layer.input_layernorm(hidden)
    B, T, _ = x.shape
    P = layer.persistent_tokens.shape[0]
    rotary = LlamaRotaryEmbedding(layer.self_attn.config)
    state, outputs = layer.memory.init_state(B), []
    for s in range(0, T, SEG):
        xs = x[:, s : s + SEG]
        L = xs.shape[1]
        h = layer.memory.retrieve(state, unit(xs))
        context = torch.cat([layer.persistent_tokens.expand(B, -1, -1), h, xs], dim=1)
        positions = torch.cat([torch.full((P,), s), torch.arange(s, s + L), torch.arange(s, s + L)])[None]
        allowed = torch.eye(
            P + 2 * L, dtype=torch.bool
        )  # rows of context tokens: discarded, keep them finite
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed[P + L :] = torch.cat([torch.ones(L, P, dtype=torch.bool), causal, causal], dim=1)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
        y = LlamaAttention.forward(
            layer.self_attn, context, position_embeddings=rotary(context, positions), attention_mask=mask
        )[0][:, -L:]  # Llama attention on an explicit context
        readout, state, _ = layer.memory(unit(y), state, update_rule=rule)
        outputs.append(y + layer.memory_gate * unit(readout) * y.pow(2).mean(-1, keepdim=True).sqrt())
    hidden = hidden + torch.cat(outputs, dim=1)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_memory_layer_matches_written_out_reference(rule):
    model = mac_model()
    assert model.config.memory_version == 3
    layer = model.model.layers[1]
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(input=args[0], output=out[0]))
    logits(model, tokens(2, 2 * SEG + 7), update_rule=rule)
    with torch.no_grad():
        expected = reference_memory_layer(layer, seen["input"], rule)
    torch.testing.assert_close(seen["output"], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_changing_a_token_never_changes_earlier_logits(rule):
    model = mac_model()
    ids = tokens(2, 3 * SEG + 8)
    base = logits(model, ids, update_rule=rule)
    for j in (3, CHUNK + 1, SEG, SEG + 5, 2 * SEG + CHUNK, 3 * SEG + 7):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1) % BASE["vocab_size"]
        out = logits(model, changed, update_rule=rule)
        torch.testing.assert_close(
            out[:, :j], base[:, :j], rtol=0, atol=1e-6, msg=f"token {j} leaked backwards"
        )
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4


@pytest.mark.parametrize("rule, carries", [("surprise", True), ("ema", True), ("none", False)])
def test_memory_carries_information_across_segments(rule, carries):
    """A token of segment 0 reaches segment 1 only through memory updates (attention is segment-local)."""
    model = mac_model()
    ids = tokens(1, 2 * SEG)
    changed = ids.clone()
    changed[:, 2] += 1
    diff = (
        (logits(model, ids, update_rule=rule) - logits(model, changed, update_rule=rule))[:, SEG:].abs().max()
    )
    assert (diff > 1e-4) if carries else (diff == 0)


# ----------------------------------------------------------------------------------------- cache and generate


def test_cache_streaming_in_pieces_equals_one_forward():
    model = mac_model()
    ids = tokens(2, 3 * SEG + 5)
    full = logits(model, ids)
    cache, outs, start = MACCache(model.config), [], 0
    with torch.no_grad():
        for size in (5, 1, 10, 1, 20, 1, 15):
            outs.append(model(ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    assert start == ids.shape[1] and cache.get_seq_length() == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rule", ["surprise", "ema", "none"])
@pytest.mark.parametrize("prompt_len", [5, 2 * SEG + 5])
def test_greedy_generate_equals_full_recomputation(rule, prompt_len):
    model = mac_model()
    prompt, steps = tokens(2, prompt_len), 2 * SEG + 3  # crosses at least two segment boundaries
    out = model.generate(
        prompt,
        max_new_tokens=steps,
        do_sample=False,
        update_rule=rule,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert isinstance(out.past_key_values, MACCache)
    assert out.past_key_values.get_seq_length() == prompt_len + steps - 1
    seq = out.sequences
    assert seq.shape == (2, prompt_len + steps)
    for step in range(steps):
        cur = prompt_len + step
        full = logits(model, seq[:, :cur], update_rule=rule)[:, -1]
        assert torch.equal(full.argmax(-1), seq[:, cur]), f"step {step}: cached generation diverged"
        torch.testing.assert_close(out.logits[step], full, rtol=0, atol=1e-4)


def test_generate_without_cache_and_continuing_a_user_cache():
    model = mac_model()
    prompt = tokens(2, SEG + 3)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    cache = MACCache(model.config)
    first = model.generate(prompt, max_new_tokens=3, do_sample=False, past_key_values=cache)
    resumed = model.generate(first, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert torch.equal(resumed, cached)
    with pytest.raises(TypeError, match="MACCache"):
        from transformers import DynamicCache

        model.generate(prompt, max_new_tokens=2, past_key_values=DynamicCache())


def test_beam_search_and_sampling_run_with_the_cache():
    """Beam search reorders the cache (K/V and memory states): same result as without a cache."""
    model = mac_model()
    prompt = tokens(2, SEG + 3)
    beams = model.generate(prompt, max_new_tokens=SEG + 2, num_beams=3, do_sample=False)
    assert torch.equal(
        beams, model.generate(prompt, max_new_tokens=SEG + 2, num_beams=3, do_sample=False, use_cache=False)
    )
    torch.manual_seed(0)
    assert model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=2).shape == (
        4,
        SEG + 7,
    )


def test_bfloat16_model_and_autocast_run():
    model = mac_model().to(torch.bfloat16)
    prompt = tokens(2, SEG + 3)
    assert model.generate(prompt, max_new_tokens=SEG, do_sample=False).shape == (2, 2 * SEG + 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mac_model()(prompt, use_cache=False)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------------------ training


def test_gradients_reach_every_memory_part():
    """At the default initialisation (closed read-out gate), one LM backward reaches every memory parameter:
    through the retrieved tokens of later segments, and the gate directly."""
    model = mac_model(open_gates=False).train()
    ids = tokens(2, 3 * SEG)
    model(ids, labels=ids).loss.backward()
    for i in (1, 3):
        layer = model.model.layers[i]
        for name, param in [
            *layer.memory.named_parameters(),
            ("memory_gate", layer.memory_gate),
            ("persistent_tokens", layer.persistent_tokens),
        ]:
            assert param.grad is not None and param.grad.abs().max() > 0, f"layer {i}: no gradient for {name}"


def test_gradient_checkpointing_gives_the_same_gradients():
    model = mac_model().train()
    ids = tokens(2, 2 * SEG + 3)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=0, atol=1e-6, msg=name)


def test_base_model_output_carries_hidden_state_and_memory_stats():
    model = mac_model()
    ids = tokens(2, 2 * SEG)
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 2 * SEG, BASE["hidden_size"])
    assert len(out.hidden_states) == BASE["num_hidden_layers"] + 1
    assert set(out.memory_stats) == {
        "surprise_norm",
        "lr_mean",
        "momentum_mean",
        "decay_mean",
        "updated_tokens",
    }
    assert out.memory_stats["updated_tokens"] == 2 * SEG and 0 < out.memory_stats["lr_mean"] < 1
    assert all(torch.isfinite(v) for v in out.memory_stats.values())
    no_memory = mac_model(memory_layers=[])
    with torch.no_grad():
        assert no_memory.model(input_ids=ids).memory_stats == {}


def test_attention_mask_all_ones_and_right_padding_accepted_left_padding_refused():
    model = mac_model()
    ids = tokens(2, SEG + 6)
    ref = logits(model, ids)
    torch.testing.assert_close(logits(model, ids, attention_mask=torch.ones_like(ids)), ref, rtol=0, atol=0)
    right = torch.ones_like(ids)
    right[1, -4:] = 0
    torch.testing.assert_close(logits(model, ids, attention_mask=right), ref, rtol=0, atol=0)
    left = torch.ones_like(ids)
    left[1, :3] = 0
    with pytest.raises(ValueError, match="only right padding"):
        logits(model, ids, attention_mask=left)


# ------------------------------------------------------------------------------------------ persistence


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    model = mac_model(tie_word_embeddings=tied, update_rule="ema")
    model.save_pretrained(tmp_path)
    loaded = MACLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory_layers == [1, 3] and loaded.config.update_rule == "ema"
    assert loaded.config.model_type == "mac_llama"
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    ids = tokens(2, 2 * SEG + 5)
    # the same weights; only kernel choices for differently aligned buffers may differ in the last bits
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-6)


def test_trust_remote_code_export_is_self_contained(tmp_path):
    """The model files copied next to the weights load through AutoModelForCausalLM with trust_remote_code."""
    model = mac_model()
    save_with_model_code(model, tmp_path)
    assert {"modeling_mac_llama.py", "configuration_mac_llama.py", "neural_memory.py", "memory_file.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules.")
    ids = tokens(1, SEG + 3)
    torch.testing.assert_close(logits(remote, ids), logits(model, ids), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ update rules


def test_update_rule_per_call():
    model = mac_model()
    ids = tokens(2, 2 * SEG)
    surprise, none, ema = (logits(model, ids, update_rule=r) for r in ("surprise", "none", "ema"))
    torch.testing.assert_close(logits(model, ids), surprise, rtol=0, atol=0)  # config default
    # the first memory chunk reads the initial memory under every rule; after the first segment they differ
    torch.testing.assert_close(surprise[:, :CHUNK], none[:, :CHUNK], rtol=0, atol=0)
    assert (surprise[:, SEG:] - none[:, SEG:]).abs().max() > 1e-3
    assert (surprise[:, SEG:] - ema[:, SEG:]).abs().max() > 1e-3
    generated = model.generate(ids[:, : SEG + 2], max_new_tokens=SEG, do_sample=False, update_rule="none")
    assert torch.equal(
        generated,
        model.generate(
            ids[:, : SEG + 2], max_new_tokens=SEG, do_sample=False, generation_config=None, update_rule="none"
        ),
    )


def test_unknown_update_rule_is_refused():
    model = mac_model()
    ids = tokens(1, 8)
    with pytest.raises(ValueError, match="update_rule must be one of"):
        model(ids, update_rule="sgd")
    with pytest.raises(ValueError, match="update_rule must be one of"):
        model.generate(ids, max_new_tokens=2, update_rule="sgd")


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(memory_layers=[4]), r"memory_layers \[4\] holds indices \[4\] outside 0..3"),
        (dict(memory_layers=[-1]), "outside 0..3"),
        (dict(memory_layers=[1, 1]), "repeats a layer index"),
        (dict(memory_chunk_size=5), r"memory_chunk_size \(5\) must divide segment_len \(16\)"),
        (dict(update_rule="adam"), "update_rule must be one of"),
        (dict(segment_len=0), "segment_len must be an integer >= 1"),
        (dict(num_persistent_tokens=-1), "num_persistent_tokens must be an integer >= 0"),
        (dict(memory_depth=0), "memory_depth must be an integer >= 1"),
        (dict(memory_expansion=0), "memory_expansion must be a number > 0"),
        (dict(memory_dim=0), "memory_dim must be None"),
        (dict(memory_max_lr=-1.0), "memory_max_lr must be a number > 0"),
    ],
)
def test_config_rejects_bad_memory_settings(overrides, message):
    values = dict(BASE, segment_len=SEG, memory_chunk_size=CHUNK, memory_layers=[1])
    values.update(overrides)
    with pytest.raises(ValueError, match=message):
        MACLlamaConfig(**values)


def test_config_json_without_memory_version_loads_as_version_1(tmp_path):
    """Checkpoints written before memory_version existed keep their update (and their parameter names)."""
    old = MACLlamaConfig(**dict(BASE, memory_chunk_size=CHUNK, segment_len=SEG, memory_layers=[1]))
    fields = old.to_dict()
    del fields["memory_version"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = MACLlamaConfig.from_pretrained(tmp_path)
    assert loaded.memory_version == 1
    memory = MACLlamaForCausalLM(loaded).model.layers[1].memory
    assert memory.input_centre is None and not memory.forget_toward_init and memory.update_bound is None
    assert MACLlamaConfig.from_pretrained(save_config(old, tmp_path / "new")).memory_version == 3


def save_config(config, folder):
    config.save_pretrained(folder)
    return folder


def test_config_defaults():
    config = MACLlamaConfig(**dict(BASE, num_hidden_layers=8))
    assert (
        config.segment_len,
        config.num_persistent_tokens,
        config.memory_chunk_size,
        config.memory_depth,
        config.memory_expansion,
        config.memory_dim,
        config.memory_max_lr,
        config.update_rule,
        config.memory_version,
        config.memory_heads,
        config.memory_update_bound,
        config.memory_max_grad_norm,
    ) == (256, 16, 32, 2, 2, None, 1.0, "surprise", 3, 1, 2.0, None)
    assert config.memory_layers == [2, 6]
    assert MACLlamaConfig(**dict(BASE, num_hidden_layers=30)).memory_layers == [2, 6, 10, 15, 19, 23, 27]
    assert MACLlamaConfig(**dict(BASE, memory_layers=[])).memory_layers == []
