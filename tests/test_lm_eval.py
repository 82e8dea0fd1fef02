"""The lm-evaluation-harness model `mxfx` on local tasks (tests/data/lm_eval), scored independently."""

import os
import subprocess
import sys

import pytest
import torch

import mxfx

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "data", "lm_eval")


class CharTokenizer:
    """Printable ASCII, one token per character (ids 3..97); 1 = BOS, 2 = EOS."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=False):
        return ([1] if add_special_tokens else []) + [ord(c) - 29 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids if 3 <= i <= 97)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def _sum_logprobs(plain, tokens, start):
    """log p(tokens[start:]) given tokens[:start], from the plain prepared forward (written here)."""
    logits = plain(torch.tensor([tokens[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, tokens[i]]) for i in range(start, len(tokens)))


@pytest.mark.slow
def test_lm_eval_scores_equal_the_prepared_forward(monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mxfx.integrations.lm_eval import MXFXLM

    monkeypatch.chdir(ROOT)  # the task files name the data relative to the repository root
    model, tok = tiny_llama(), CharTokenizer()
    adapter = MXFXLM(pretrained=model, tokenizer=tok, config="mxfp8", max_gen_toks=6)
    results = lm_eval.simple_evaluate(
        model=adapter, tasks=["mxfx_tiny_choice", "mxfx_tiny_rolling", "mxfx_tiny_generate"],
        task_manager=TaskManager(include_path=TASKS), log_samples=True, num_fewshot=0)
    samples = results["samples"]
    assert {task: len(samples[task]) for task in samples} == dict.fromkeys(samples, 3)
    # independent: the model prepared as it is (its own forward over input_ids), scored here
    plain = mxfx.prepare(model, "mxfp8", (torch.randint(3, 98, (2, 16)),))

    for sample in samples["mxfx_tiny_choice"]:
        doc = sample["doc"]
        context = tok.encode(doc["question"])
        expected = [_sum_logprobs(plain, context + tok.encode(" " + choice), len(context)) for choice in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-5)
    accuracy = results["results"]["mxfx_tiny_choice"]["acc,none"]
    hits = [max(range(len(s["doc"]["choices"])), key=lambda i: s["resps"][i][0][0]) == s["doc"]["answer"]
            for s in samples["mxfx_tiny_choice"]]
    assert accuracy == pytest.approx(sum(hits) / len(hits))

    for sample in samples["mxfx_tiny_rolling"]:
        tokens = [tok.bos_token_id] + tok.encode(sample["doc"]["text"])  # one window: the prefix token, then all
        assert sample["resps"][0][0] == pytest.approx(_sum_logprobs(plain, tokens, 1), abs=1e-5)

    for sample in samples["mxfx_tiny_generate"]:
        ids = torch.tensor([tok.encode(sample["doc"]["question"])])
        start = ids.shape[1]
        for _ in range(6):  # greedy by full forwards, stopped at EOS
            token = plain(ids).logits[0, -1].argmax()
            if int(token) == tok.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=-1)
        expected = tok.decode(ids[0, start:].tolist()).split(".")[0]
        assert sample["resps"][0][0] == expected


def test_the_cli_module_registers_the_model():
    code = ("import mxfx.integrations.lm_eval\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('mxfx').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["MXFXLM", "HFLM"]
    help_text = subprocess.run([sys.executable, "-m", "mxfx.integrations.lm_eval", "run", "--help"],
                               capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0 and "--model" in help_text.stdout
