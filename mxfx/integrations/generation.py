"""Text generation with a prepared Hugging Face causal LM: a KV cache in the exported graph.

    lm = mxfx.integrations.generation.prepare_lm(model, "mxfp8")          # one prepare
    out = lm.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # like model.generate
    lm.compile()                                                          # prefill and decode compiled

`prepare_lm` exports a small wrapper around the model (`CacheLM`) whose inputs are the new tokens,
their positions, a 4-D attention mask, the cache slots they are written to, and the KV cache
(one K and one V tensor per layer; `(codes, scales)` pairs with an MX KV cache), and whose outputs
are the logits and the updated cache. The wrapper is prepared once (`mxfx.prepare`) at a prompt
length >= 2; the one-token decode step and batch 1 are shape classes of that prepared module
(`mxfx.graph.shape_classes`), exported on first use with the *same* quantized weights.

Quantization semantics (what a decode step quantizes, compared with a full forward over the whole
sequence, OCP MX v1.0 §6.3 blocks):

- linears: activations are blocked along in_features, one token per row, so the last position's
  blocks are the same in both;
- attention Q and K are blocked along head_dim (per token): the same;
- attention P (softmax output) is blocked along the keys: the cache holds exactly 0 in the slots
  not yet written and the mask gives them probability 0, and blocks start at key 0 in both, so the
  last query's P blocks are the same; V is blocked along the keys too, and its blocks likewise
  contain the same rows (unwritten slots are 0, which a partial block of the full forward is padded
  with), so V is quantized as the full forward quantizes it *for the sequence length so far*.
  This holds when the V rows of padding positions do not change with the length: padding query
  rows attend to themselves only (transformers instead lets a fully masked row attend to every
  key, which changes nothing in fp32 and is not used here).
- the floating-point reductions (GEMMs over 1 row vs many, softmax over S vs L keys) may differ
  in the last bit, so logits agree to rounding and greedy tokens agree.

An MX KV cache (`kv_cache="fp8_e4m3"` or an `MXSpec`) stores K and V as uint8 element codes and
E8M0 scale codes, both blocked along head_dim, quantized once when a token is written and
dequantized when read. Blocking V along head_dim (not along the keys, as attention's own V spec
does) is what lets a token's V be written once: a block along the keys would change as the cache
grows. With an attention rule that also quantizes V, the dequantized cache V is quantized again
along the keys at each step (two roundings).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from typing import Any

import torch

from mxfx.errors import MXFXError, MXValueError
from mxfx.graph import shape_classes
from mxfx.graph.config import QuantConfig, load_config
from mxfx.graph.prepare import prepare, setup_class_module
from mxfx.graph.shape_classes import module_for
from mxfx.numerics import ops as _ops  # noqa: F401  (registers torch.ops.mxfx.quantize / dequantize)
from mxfx.numerics.spec import MXSpec

log = logging.getLogger(__name__)
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kv spec: CacheLM}


class GenerationError(MXFXError, ValueError):
    """A model or argument the generation path cannot serve (the message says which and why)."""


class _GraphCache:
    """The cache object the Hugging Face attention layers call `update` on, inside the graph:
    it writes the new K/V at `cache_position` (out of place) and records the updated tensors."""

    def __init__(self, tensors: tuple, cache_position: torch.Tensor, spec: MXSpec | None) -> None:
        self.tensors, self.position, self.spec = tensors, cache_position, spec
        self.updated: list = list(tensors)
        self.is_compileable = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.spec is None:
            keys = self.tensors[2 * layer_idx].index_copy(2, self.position, key_states)
            values = self.tensors[2 * layer_idx + 1].index_copy(2, self.position, value_states)
            self.updated[2 * layer_idx:2 * layer_idx + 2] = [keys, values]
            return keys, values
        out = []
        for j, states in enumerate((key_states, value_states)):
            codes, scales = self.tensors[4 * layer_idx + 2 * j:4 * layer_idx + 2 * j + 2]
            new_codes, new_scales = kv_quantize(states, self.spec)  # once, when written
            codes = codes.index_copy(2, self.position, new_codes)
            scales = scales.index_copy(2, self.position, new_scales)
            self.updated[4 * layer_idx + 2 * j:4 * layer_idx + 2 * j + 2] = [codes, scales]
            shape = [*codes.shape[:3], states.shape[3]]
            out.append(torch.ops.mxfx.dequantize(codes, scales, self.spec.format, self.spec.block_size, -1, shape,
                                                 states.dtype))
        return tuple(out)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise GenerationError("CacheLM passes position_ids: the model should not ask the cache for its length")


def kv_quantize(states: torch.Tensor, spec: MXSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """MX KV cache codes of `states` (batch, heads, tokens, head_dim): (element codes, E8M0 scale
    codes), both uint8, blocked along head_dim (OCP MX v1.0 §6.3)."""
    return torch.ops.mxfx.quantize(states, spec.format, spec.block_size, -1, spec.scale_mode, spec.rounding, 0, False)


class CacheLM(torch.nn.Module):
    """A Hugging Face causal LM with its KV cache as explicit inputs and outputs (exportable).

    forward(input_ids (B, T), position_ids (B, T), attention_mask (B, 1, T, S) bool (sdpa) or
    additive float (eager), cache_position (T,), *cache) -> (logits (B, T, vocab), *updated cache),
    the cache being K, V per layer (B, kv_heads, S, head_dim), or with `kv_cache` an MXSpec,
    K codes, K scales, V codes, V scales per layer.
    """

    def __init__(self, model: torch.nn.Module, kv_cache: MXSpec | None = None) -> None:
        super().__init__()
        self.model = model
        self.kv_cache = kv_cache

    def forward(self, input_ids, position_ids, attention_mask, cache_position, *cache):
        state = _GraphCache(cache, cache_position, self.kv_cache)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=state,
                         use_cache=True)
        return (out.logits, *state.updated)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    bool_mask: bool  # sdpa takes a boolean mask; eager attention an additive one


def _shapes(model: torch.nn.Module) -> _Shapes:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise GenerationError(f"{type(model).__name__} has {sorted(set(layer_types))} layers: mxfx generation "
                              "serves full-attention decoders only (one 4-D mask for every layer)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    impl = getattr(config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise GenerationError(f"attention implementation {impl!r}: mxfx generation takes 'sdpa' or 'eager'")
    dtype = next(model.parameters()).dtype
    return _Shapes(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim, dtype,
                   impl == "sdpa")


class PreparedLM:
    """A prepared causal LM with a KV cache: `generate`, `logits`, `compile` (see `prepare_lm`)."""

    def __init__(self, model: torch.nn.Module, wrapper: CacheLM, prepared: torch.nn.Module | None,
                 kv_cache: MXSpec | None) -> None:
        self.model = model  # kept: the prepared module re-exports it for new shape classes
        self.wrapper = wrapper
        self.prepared = prepared  # None: no quantization (the wrapper runs eagerly)
        self.kv_cache = kv_cache
        self.shapes = _shapes(model)
        self._compile: dict | None = None
        self._compiled: dict[int, Any] = {}
        self.generation_config = getattr(model, "generation_config", None)

    # -- the graph ---------------------------------------------------------------------------
    def module_for(self, args: tuple) -> torch.nn.Module:
        """The module (prefill, decode, or another shape class) that runs these inputs."""
        return self.wrapper if self.prepared is None else module_for(self.prepared, args)

    def _run(self, *args):
        module = self.module_for(args)
        if self._compile is None:
            return module(*args) if module is not self.prepared else type(module).forward(module, *args)
        compiled = self._compiled.get(id(module))
        if compiled is None:
            forward = module if module is not self.prepared else functools.partial(type(module).forward, module)
            compiled = self._compiled[id(module)] = torch.compile(forward, **self._compile)
        return compiled(*args)

    def compile(self, **options) -> PreparedLM:
        """Compile every module this LM runs (prefill and decode, each shape class) with
        `torch.compile(module, **options)` on first use. Returns self."""
        self._compile, self._compiled = dict(options), {}
        return self

    def empty_cache(self, batch: int, length: int, device=None) -> list[torch.Tensor]:
        """A zero cache of `length` slots (zero codes and scales with an MX KV cache: value 0)."""
        s = self.shapes
        if self.kv_cache is None:
            return [torch.zeros(batch, s.kv_heads, length, s.head_dim, dtype=s.dtype, device=device)
                    for _ in range(2 * s.layers)]
        codes, scales = kv_quantize(torch.zeros(batch, s.kv_heads, length, s.head_dim, dtype=s.dtype, device=device),
                                    self.kv_cache)
        return [t.clone() for _ in range(2 * s.layers) for t in (codes, scales)]

    def step(self, input_ids, position_ids, real: torch.Tensor, cache_position, cache: list):
        """One forward of new tokens at `cache_position` (slots), `real` (B, S) marking the slots
        that hold tokens (not padding). Returns (logits (B, T, vocab), updated cache)."""
        mask = step_mask(real, cache_position, self.shapes.bool_mask, self.shapes.dtype)
        logits, *cache = self._run(input_ids, position_ids, mask, cache_position, *cache)
        return logits, cache

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of a whole sequence (one prefill into a cache of exactly T slots)."""
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        batch, length = input_ids.shape
        logits, _ = self.step(input_ids, positions(mask2d), mask2d.bool(), torch.arange(length),
                              self.empty_cache(batch, length, input_ids.device))
        return logits

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 output_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Generate like transformers' `model.generate` (left padding, greedy or sampling).

        Args:
            input_ids: (B, P) prompt tokens, left-padded when the prompts differ in length.
            attention_mask: (B, P) 1 for tokens, 0 for padding (default: all ones).
            max_new_tokens: tokens generated after the prompt at most.
            do_sample: sample (temperature, top_k, top_p, then `torch.multinomial`, in that order,
                as transformers' logits warpers do) instead of taking the argmax.
            temperature, top_k, top_p: default to the model's generation_config (transformers:
                1.0, 50, 1.0).
            eos_token_id: a token (or tokens) that ends a sequence; later positions get
                `pad_token_id`, and generation stops when every sequence has ended. Default: the
                model's generation_config.
            pad_token_id: default: generation_config's, else the first eos token.
            generator: for sampling (default: torch's global generator, as transformers uses).
            output_logits: also return each step's last-position logits (fp32, (B, vocab)).

        Returns:
            (B, P + n) tokens, n <= max_new_tokens; with output_logits, (tokens, [n logits]).

        Example:
            >>> lm = prepare_lm(model, "mxfp8")  # doctest: +SKIP
            >>> lm.generate(ids, attention_mask=mask, max_new_tokens=16)  # doctest: +SKIP
        """
        gen = self.generation_config
        temperature = _default(temperature, gen, "temperature", 1.0)
        top_k = _default(top_k, gen, "top_k", 50)
        top_p = _default(top_p, gen, "top_p", 1.0)
        eos = _default(eos_token_id, gen, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = _default(pad_token_id, gen, "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        if max_new_tokens < 1:
            raise MXValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch, length = input_ids.shape
        mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        slots = length + max_new_tokens
        real = torch.zeros(batch, slots, dtype=torch.bool, device=input_ids.device)
        real[:, :length] = mask2d.bool()
        cache = self.empty_cache(batch, slots, input_ids.device)
        logits, cache = self.step(input_ids, positions(mask2d), real, torch.arange(length), cache)
        tokens, unfinished = input_ids, torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        steps = []
        for i in range(max_new_tokens):
            scores = logits[:, -1, :].to(torch.float32)
            steps.append(scores)
            if do_sample:
                probs = torch.softmax(warp(scores, temperature, top_k, top_p), dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            if eos:
                unfinished &= ~torch.isin(next_tokens, torch.tensor(eos, device=next_tokens.device))
            if not unfinished.any() or i == max_new_tokens - 1:
                break
            slot = length + i
            real[:, slot] = True
            mask2d = torch.cat([mask2d, mask2d.new_ones(batch, 1)], dim=-1)
            logits, cache = self.step(next_tokens[:, None], positions(mask2d)[:, -1:], real,
                                      torch.tensor([slot], device=input_ids.device), cache)
        return (tokens, steps) if output_logits else tokens


def _default(value, config, name: str, fallback):
    if value is not None:
        return value
    found = getattr(config, name, None) if config is not None else None
    return fallback if found is None else found


def positions(mask2d: torch.Tensor) -> torch.Tensor:
    """Position ids from a (B, L) attention mask, as transformers' generate computes them."""
    position_ids = mask2d.long().cumsum(-1) - 1
    return position_ids.masked_fill(mask2d == 0, 1)


def step_mask(real: torch.Tensor, cache_position: torch.Tensor, as_bool: bool, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, T, S) mask of queries at `cache_position`: a query sees the real (non-padding)
    slots up to its own; a padding query, which would see nothing, sees itself only."""
    slots = torch.arange(real.shape[1], device=real.device)
    allowed = real[:, None, :] & (slots[None, None, :] <= cache_position[None, :, None])  # (B, T, S)
    alone = ~allowed.any(-1, keepdim=True) & (slots[None, None, :] == cache_position[None, :, None])
    allowed = (allowed | alone)[:, None]
    if as_bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=real.device).masked_fill(~allowed, torch.finfo(dtype).min)


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' temperature, top-k and top-p logits warpers, in its order (scores (B, V))."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return scores


def prepare_lm(model: torch.nn.Module, config: QuantConfig | str | None = None, *,
               kv_cache: MXSpec | str | None = None, example_batch: int = 2, example_length: int = 5) -> PreparedLM:
    """Prepare a Hugging Face causal LM for generation with a KV cache in its graph.

    Args:
        model: a decoder-only transformers model (`LlamaForCausalLM`, Qwen2, SmolLM2, ...) with
            'sdpa' or 'eager' attention and full attention in every layer; it is not modified.
        config: a QuantConfig, preset name or TOML path; None: no quantization (the wrapper runs
            eagerly in full precision, e.g. as a baseline).
        kv_cache: store K and V in this MX format (a format name or an MXSpec), blocked along
            head_dim; None: the model's dtype.
        example_batch, example_length: the prefill shape prepare exports at (>= 2 each; other
            batch sizes and lengths, 1 included, are shape classes of the same module).

    Returns:
        A PreparedLM: `generate(...)`, `logits(...)`, `compile(...)`.

    Raises:
        GenerationError: a model this path cannot serve.

    Example:
        >>> lm = prepare_lm(model, "mxfp8", kv_cache="fp8_e4m3")  # doctest: +SKIP
        >>> text = tokenizer.decode(lm.generate(ids, max_new_tokens=32)[0])  # doctest: +SKIP
    """
    if example_batch < 2 or example_length < 2:
        raise MXValueError("example_batch and example_length must be >= 2 (size 1 is a shape class of its own)")
    spec = MXSpec(kv_cache) if isinstance(kv_cache, str) else kv_cache
    shapes = _shapes(model)
    # one wrapper per model and KV cache spec: its exported programs are shared by every config
    wrapper = _WRAPPERS.setdefault(model, {}).setdefault(spec, None) or CacheLM(model, spec).eval()
    _WRAPPERS[model][spec] = wrapper
    lm = PreparedLM(model, wrapper, None, spec)
    if config is None:
        return lm
    ids = torch.zeros(example_batch, example_length, dtype=torch.long)
    slots = example_length + 3  # distinct from the prompt length: the two stay separate dimensions
    mask2d = torch.ones_like(ids)
    real = torch.ones(example_batch, slots, dtype=torch.bool)
    cache_position = torch.arange(example_length)
    args = (ids, positions(mask2d), step_mask(real, cache_position, shapes.bool_mask, shapes.dtype), cache_position,
            *lm.empty_cache(example_batch, slots))
    lm.prepared = prepare(shape_classes.exported(wrapper, args), config)
    shape_classes.install(lm.prepared, wrapper, load_config(config), False, False, args, {}, setup_class_module)
    return lm
