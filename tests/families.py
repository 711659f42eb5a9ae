"""Tiny random configs of every supported family, built from their transformers config classes."""

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILY_CONFIGS = {
    "olmoe": dict(intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2, num_experts=8,
                      num_experts_per_tok=2, head_dim=8),
    "mixtral": dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "llama": dict(intermediate_size=48, num_hidden_layers=2),
    "qwen2": dict(intermediate_size=48, num_hidden_layers=2),
}
MOE_FAMILIES = [f for f in FAMILY_CONFIGS if f not in ("llama", "qwen2")]


def tiny_model(family: str, seed: int = 0, **fields):
    """A tiny random model of ``family``; ``fields`` override its config (e.g. ``num_hidden_layers``)."""
    from moelang.models import build_config, init_model

    config = build_config({"model_type": family, **COMMON, **FAMILY_CONFIGS[family], **fields})
    return init_model(config, seed=seed)


def tiny_olmoe_with_expert_counts(experts_per_layer: list[int], seed: int = 0):
    """A tiny OLMoE whose MoE layers have the given, different numbers of experts (the shape of a
    LayerMoE-expanded model), built by hand: each layer's fused expert tensors and router weight are
    replaced with random ones of that many rows. Returns (model, hidden, expert width)."""
    import torch
    from torch import nn

    from moelang.models import build_config, init_model

    fields = {**COMMON, **FAMILY_CONFIGS["olmoe"], "num_hidden_layers": len(experts_per_layer)}
    model = init_model(build_config({"model_type": "olmoe", **fields}), seed=seed).eval()
    hidden, width = fields["hidden_size"], fields["intermediate_size"]
    generator = torch.Generator().manual_seed(seed + 1)
    for layer, count in zip(model.model.layers, experts_per_layer):
        mlp = layer.mlp
        mlp.experts.gate_up_proj = nn.Parameter(torch.randn(count, 2 * width, hidden, generator=generator) * 0.1)
        mlp.experts.down_proj = nn.Parameter(torch.randn(count, hidden, width, generator=generator) * 0.1)
        mlp.gate.weight = nn.Parameter(torch.randn(count, hidden, generator=generator))
        mlp.experts.num_experts = mlp.gate.num_experts = count
    return model, hidden, width
