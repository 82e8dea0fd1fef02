"""lm-evaluation-harness model `mxfx`: evaluate a prepared (MX-quantized) Hugging Face causal LM.

lm-eval 0.4.x finds models in its own registry only (no plugin entry points), so run its command
line through this module, which registers the model first:

    python -m mxfx.integrations.lm_eval run --model mxfx \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M,config=mxfp8 --tasks hellaswag

or, in Python, `import mxfx.integrations.lm_eval` before `lm_eval.simple_evaluate(model="mxfx", ...)`
(or pass an `MXFXLM` instance). Model arguments: `pretrained` (a path or hub name, or a model
object in Python), `config` (a preset, TOML path or QuantConfig; "none" for full precision),
`kv_cache` (an MX format for the KV cache), `dtype`, `attn_implementation`, `max_length`,
`max_gen_toks`, `tokenizer`.

Every request runs alone at batch 1 (no padding): with attention quantized along the keys, padding
tokens would share MX blocks with real ones and change the scores. Log-likelihoods come from one
prefill of the whole sequence (`PreparedLM.logits`), generation from `PreparedLM.generate` (greedy
unless the task asks to sample).
"""

from __future__ import annotations

import logging

import torch

from mxfx.errors import MissingDependencyError

try:
    import lm_eval.models  # noqa: F401  (the built-in models first: the registry then holds both)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from tqdm import tqdm
except ImportError as error:  # pragma: no cover - the optional extra
    raise MissingDependencyError("mxfx.integrations.lm_eval needs lm-eval: pip install 'mxfx[lm-eval]'") from error

from mxfx.integrations.generation import prepare_lm

log = logging.getLogger(__name__)


@register_model("mxfx")
class MXFXLM(TemplateLM):
    """An lm-eval model: a Hugging Face causal LM prepared with an mxfx config.

    Args:
        pretrained: a model path or hub name (loaded with AutoModelForCausalLM), or a model.
        config: a QuantConfig, preset name or TOML path; "none"/None: full precision.
        tokenizer: a tokenizer or its path (default: `pretrained`'s); anything with `encode`,
            `decode` and `eos_token_id`.
        kv_cache: an MX format name for the KV cache (default: none).
        dtype: the model's dtype when loading ("float32").
        attn_implementation: "sdpa" (default) or "eager".
        max_length: the longest sequence scored (default: the model's max_position_embeddings).
        max_gen_toks: generate_until's default token budget (256, as lm-eval's hf model).
        add_bos_token: prepend BOS when tokenizing (default False, as lm-eval's hf model).
    """

    def __init__(self, pretrained="", config="mxfp8", tokenizer=None, kv_cache=None, dtype="float32",
                 attn_implementation="sdpa", max_length=None, max_gen_toks=256, add_bos_token=False,
                 batch_size=1, device="cpu", **kwargs) -> None:
        super().__init__()
        if kwargs:
            log.warning("mxfx lm_eval model: ignoring arguments %s", sorted(kwargs))
        if str(device) != "cpu":
            log.warning("mxfx lm_eval model: device %s is not used; the model runs where its weights are", device)
        model = pretrained
        if isinstance(pretrained, str):
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(
                pretrained, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
            tokenizer = tokenizer or pretrained
        if isinstance(tokenizer, str):
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None:
            raise ValueError("mxfx lm_eval model: pass tokenizer= with a model object")
        model.eval()
        model.config.use_cache = False  # the export traces the model without transformers' own cache
        self.model, self.tokenizer = model, tokenizer
        config = None if config in (None, "none", "None", "") else config
        self.lm = prepare_lm(model, config, kv_cache=kv_cache)
        self._max_length = int(max_length) if max_length else getattr(model.config, "max_position_embeddings", 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token in (True, "True", "true", "1")
        if str(batch_size) not in ("1", "auto"):
            log.info("mxfx lm_eval model: every request runs at batch 1 (batch_size %s ignored)", batch_size)

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_special_tokens=special))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------------------------
    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        """log-softmax of the logits of `tokens` (1, T, vocab) from one prefill."""
        with torch.no_grad():
            logits = self.lm.logits(torch.tensor([tokens], dtype=torch.long))
        return torch.log_softmax(logits.to(torch.float32), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for key, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="mxfx"):
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            logprobs = self._logprobs(whole[:-1])[0, -len(continuation_enc):]
            target = torch.tensor(continuation_enc, dtype=torch.long)
            answer = (float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the log-likelihoods of each string's tokens, in disjoint windows of max_length
        (the first conditioned on the prefix token), as lm-eval's hf model computes it."""
        out = []
        for (string,) in [request.args for request in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in windows], disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate from each context until one of the request's `until` strings (default: the EOS
        text) or `max_gen_toks` tokens; greedy unless the request sets `do_sample`."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="mxfx"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if temperature == 0.0:
                do_sample = False
            sample = {k: kwargs.pop(k) for k in ("top_k", "top_p") if k in kwargs}
            if kwargs:
                log.warning("mxfx lm_eval model: generation arguments %s are not used", sorted(kwargs))
            tokens = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            ids = torch.tensor([tokens], dtype=torch.long)
            generated = self.lm.generate(ids, max_new_tokens=max_new, do_sample=do_sample,
                                         temperature=temperature if do_sample else None, eos_token_id=self.eot_token_id,
                                         **(sample if do_sample else {}))
            text = self.tok_decode(generated[0, ids.shape[1]:].tolist())
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


if __name__ == "__main__":  # python -m mxfx.integrations.lm_eval run --model mxfx ...
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
