"""Tiny mixture-of-experts architectures for the tests: small random Hugging Face configs (no downloads)
and one hand-written model with a per-expert `nn.Linear` list.

Each builder returns (model, args, kwargs) in eval mode with seeded weights and inputs. Sizes:
hidden 64, expert intermediate 96 (differs from hidden, so that `[E, out, in]` and `[E, in, out]`
layouts cannot be confused by shape), 2 layers, 4 experts, top-2 routing, 12 tokens a sequence.
`impl` is transformers' experts implementation: "grouped_mm" (its default on CPU; an opaque
`transformers.grouped_mm_fallback` op in fp32 exports, `aten._grouped_mm` in bf16) or
"batched_mm" (`W[expert_ids]` then `bmm`). "eager" (a data-dependent loop) does not export. Llama 4
has one implementation of its own ("bmm": the stacked parameter batched against every token).

    model, args, kwargs = mxfx.testing.moe.MOE["mixtral"]("batched_mm")
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, HIDDEN, EXPERT_HIDDEN, LAYERS, EXPERTS, TOP_K, SEQ = 96, 64, 96, 2, 4, 2, 12
IMPLEMENTATIONS = ("grouped_mm", "batched_mm")

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, use_cache=False, num_experts_per_tok=TOP_K)


def _ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _hf(config_cls: str, model_cls: str, impl: str, dtype: torch.dtype = torch.float32, **fields):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_COMMON, **fields})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval().to(dtype)
    model.set_experts_implementation(impl)
    return model, (_ids(),), {}


def mixtral(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """Mixtral: [E, out, in] experts, fused gate_up, softmax-top-k router (a bare `nn.Linear` gate)."""
    return _hf("MixtralConfig", "MixtralForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               num_local_experts=EXPERTS)


def gpt_oss(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """gpt-oss: transposed [E, in, out] experts with biases, interleaved gate/up, attention sinks."""
    return _hf("GptOssConfig", "GptOssForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               num_local_experts=EXPERTS, head_dim=16, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def qwen3_moe(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """Qwen3-MoE: [E, out, in] experts, q/k norms."""
    return _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               moe_intermediate_size=EXPERT_HIDDEN, num_experts=EXPERTS, head_dim=16)


def olmoe(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """OLMoE: [E, out, in] experts, q/k norms over the whole projection."""
    return _hf("OlmoeConfig", "OlmoeForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN, num_experts=EXPERTS)


def qwen2_moe(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """Qwen2-MoE: routed experts plus a shared expert (nn.Linear) behind a 1-wide sigmoid gate."""
    return _hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               moe_intermediate_size=EXPERT_HIDDEN, shared_expert_intermediate_size=EXPERT_HIDDEN,
               num_experts=EXPERTS)


def deepseek_v3(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """DeepSeek-V3: low-rank (MLA) attention, a dense first layer, sigmoid group routing, a shared expert."""
    return _hf("DeepseekV3Config", "DeepseekV3ForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               moe_intermediate_size=EXPERT_HIDDEN, n_routed_experts=EXPERTS, n_group=1, topk_group=1,
               first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
               v_head_dim=16, n_shared_experts=1, num_key_value_heads=4)  # MLA: one latent K/V per head


def granitemoe(impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    """GraniteMoE: [E, out, in] experts, muP-style multipliers on embeddings, residuals and logits."""
    return _hf("GraniteMoeConfig", "GraniteMoeForCausalLM", impl, dtype, intermediate_size=EXPERT_HIDDEN,
               num_local_experts=EXPERTS)


def llama4(impl: str = "bmm", dtype: torch.dtype = torch.float32):
    """Llama 4 (text): every token through every expert, `bmm(x.view(E, -1, in), W[E, in, out])` on
    router-scaled inputs (its only experts implementation), a shared expert, an nn.Linear router."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        **{**_COMMON, "num_experts_per_tok": 1}, head_dim=16, intermediate_size=EXPERT_HIDDEN,
        intermediate_size_mlp=2 * HIDDEN, num_local_experts=EXPERTS, moe_layers=list(range(LAYERS)),
        attention_chunk_size=8)
    config._attn_implementation = "eager"
    return transformers.Llama4ForCausalLM(config).eval().to(dtype), (_ids(),), {}


def implementations(arch: str) -> tuple[str, ...]:
    """The experts implementations an architecture of `MOE` exports with."""
    return ("bmm",) if arch == "llama4" else IMPLEMENTATIONS


class ExpertList(torch.nn.Module):
    """A mixture of experts as a per-expert `nn.Linear` list, every expert run on every token and
    weighted by the router's top-k weights (zero for experts not chosen): a dense, exportable form."""

    def __init__(self, hidden: int = HIDDEN, inner: int = EXPERT_HIDDEN, experts: int = EXPERTS, top_k: int = TOP_K):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, inner), torch.nn.GELU(), torch.nn.Linear(inner, hidden))
            for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        dense = torch.zeros(*x.shape[:-1], len(self.experts), dtype=x.dtype).scatter(-1, chosen, weights)
        return sum(dense[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


def expert_list(impl: str = "", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = ExpertList().eval().to(dtype)
    return model, (torch.randn(2, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype),), {}


def expected_linear_sites(model: torch.nn.Module) -> set[str]:
    """The linear sites a model should have, from its modules and parameters (not from any graph):
    nn.Linear modules, routers (a bare 2-D weight applied with F.linear) and each stacked 3-D
    expert parameter."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(name)
        elif "Router" in type(module).__name__ or (name.endswith("mlp.gate") and hasattr(module, "weight")):
            names.add(name)
        names |= {f"{name}.{p}" for p, v in module.named_parameters(recurse=False) if v.dim() == 3}
    return names


MOE = {"mixtral": mixtral, "gpt_oss": gpt_oss, "qwen3_moe": qwen3_moe, "olmoe": olmoe, "qwen2_moe": qwen2_moe,
       "deepseek_v3": deepseek_v3, "granitemoe": granitemoe, "llama4": llama4}
