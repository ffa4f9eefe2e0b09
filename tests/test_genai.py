"""moec.export_genai: a folder onnxruntime-genai runs (model.onnx with the KV cache, genai_config.json, the tokenizer).
Its generator (greedy, one prompt and a padded batch of two) gives HF's tokens, for HF families and an HF LM
whose MLPs are hand-written MoE blocks; a fresh process with no torch runs the folder from text."""

import dataclasses
import json
import subprocess
import sys

import handwritten
import numpy as np
import pytest
import torch

import moec
from moec import examples, models

og = pytest.importorskip("onnxruntime_genai")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe", "deepseek_v3", "qwen3_next", "jamba"]


def _hf_tokens(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """HF's greedy continuation of each prompt (a batch left-padded with the eos id, as HF's generate wants it)."""
    width = max(map(len, prompts))
    pad = model.generation_config.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=pad)
    return out[:, width:].tolist()


def _genai_tokens(folder, prompts: list[list[int]], new: int) -> list[list[int]]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(map(len, prompts)) + new, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    tokenizer = og.Tokenizer(model)
    generator.append_tokens(tokenizer.encode_batch([bytes(p).decode() for p in prompts]))
    out = [[] for _ in prompts]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(out, generator.get_next_tokens()):
            row.append(int(token))
    return out


def _lm(family):
    model = models.tiny_model(family).eval()
    model.generation_config.eos_token_id = 0  # byte_tokenizer's eos (NUL): never generated from these prompts
    return model


PROMPTS = [list(b"def main(argv):\n    "), list(b"import os")]


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_generates_hf_tokens(family, tmp_path):
    model = _lm(family)
    report = moec.export_genai(model, examples.byte_tokenizer(), tmp_path)
    assert report.blocks and all(b.op == "MoE" for b in report.blocks), str(report)
    config = json.loads((tmp_path / "genai_config.json").read_text())["model"]
    assert config["type"] == "decoder" and config["decoder"]["num_hidden_layers"] == model.config.num_hidden_layers
    if family == "deepseek_v3":  # MLA caches latents of 16 and 8: one head_size for both, halves of their 24
        assert config["decoder"]["num_key_value_heads"] == 1 and config["decoder"]["head_size"] == 12
    assert _genai_tokens(tmp_path, PROMPTS[:1], 12) == _hf_tokens(model, PROMPTS[:1], 12)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "qwen3_next",
                                    pytest.param("jamba", marks=pytest.mark.slow)])
def test_genai_batch_with_padding(family, tmp_path):
    """genai pads the batch on the right (HF's generate on the left): each row still gets HF's tokens, also through
    GPT-OSS's sliding windows (4 positions here, shorter than the padding)."""
    model = _lm(family)
    moec.export_genai(model, examples.byte_tokenizer(), tmp_path)
    assert _genai_tokens(tmp_path, PROMPTS, 10) == _hf_tokens(model, PROMPTS, 10)


def _second_turn(folder, first: list[int], new: int, second: list[int], rewind: bool):
    """A chat's second turn on one genai generator: the first prompt, `new` tokens, then `second` appended (after
    rewinding to 0 and appending the whole conversation, when `rewind`). -> (the conversation, the logits of its
    last position, the `new` tokens that follow)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(first) + len(second) + 2 * new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([first])
    for _ in range(new):
        generator.generate_next_token()
    conversation = [int(t) for t in generator.get_sequence(0)] + second
    if rewind:
        generator.rewind_to(0)
        generator.append_tokens([conversation])
    else:
        generator.append_tokens([second])
    logits = torch.from_numpy(np.asarray(generator.get_logits())).reshape(-1)[-_vocab(folder):]
    out = []
    for _ in range(new):
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return conversation, logits, out


def _vocab(folder) -> int:
    return json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]


def test_a_second_turn_never_gives_a_wrong_answer(tmp_path):
    """onnxruntime-genai 0.18 does not run the last generated token before a second append_tokens: it counts it in
    the positions and the mask only. The folders of genai's own builder (a shared past/present buffer) then answer
    from a cache without that token (measured on a tiny GPT-OSS: logits 0.31 off HF's). moec's cache is sized by
    what the step feeds, so the run fails: the mask is one position wider than the past and the new tokens, which
    the causal mask's nodes refuse (backends/ort_mask.py); rewinding
    to 0 and appending the whole conversation gives HF's logits and tokens. Should a genai version run the token,
    the second turn must give HF's."""
    model = _lm("mixtral")
    moec.export_genai(model, examples.byte_tokenizer(), tmp_path)
    first, second = PROMPTS[0], list(b" import os")

    def check(conversation, logits, tokens):
        with torch.no_grad():
            want = model(torch.tensor([conversation])).logits[0, -1]
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
        assert tokens == _hf_tokens(model, [conversation], len(tokens))[0]

    check(*_second_turn(tmp_path, first, 6, second, rewind=True))
    try:
        turn = _second_turn(tmp_path, first, 6, second, rewind=False)
    except RuntimeError as e:
        assert "the attention mask is as wide as the past and the new tokens" in str(e), str(e)
    else:
        check(*turn)


class _MoEMLP(torch.nn.Module):
    """A hand-written MoE block in an HF decoder layer's MLP slot."""

    def __init__(self, hidden, seed):
        super().__init__()
        spec = dataclasses.replace(handwritten.PRESETS["mixtral_hf_where"], hidden=hidden)
        self.block = handwritten.make_block(spec, seed=seed)

    def forward(self, x):
        return self.block(x)


def test_genai_runs_a_hand_written_moe_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         eos_token_id=0)).eval()
    for i, layer in enumerate(model.model.layers):
        layer.mlp = _MoEMLP(32, seed=i)
    report = moec.export_genai(model, examples.byte_tokenizer(), tmp_path)
    assert len(report.blocks) == 2 and all(b.op == "MoE" for b in report.blocks), str(report)
    assert _genai_tokens(tmp_path, PROMPTS[:1], 12) == _hf_tokens(model, PROMPTS[:1], 12)


def test_a_model_without_moe_exports_with_a_warning_and_bad_paths_fail_first(tmp_path):
    """A dense LM exports as it is, saying so (compile warns the same); a path that cannot be written fails before
    the trace, not after it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.warns(UserWarning, match="no MoE block found"):
        moec.export_genai(model, examples.byte_tokenizer(), tmp_path / "dense")
    (tmp_path / "file").write_text("")
    ids = torch.randint(3, 256, (2, 5))
    for path, why in ((tmp_path, "is a directory"), (tmp_path / "file" / "m.onnx", "is not a directory")):
        with pytest.raises(ValueError, match=why):
            moec.export_onnx(model, ids, path)


def test_a_fresh_process_without_torch_runs_the_folder_from_text(tmp_path):
    model = examples.fine_moe_lm()
    tokenizer = examples.byte_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    moec.export_genai(model, tokenizer, tmp_path)
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # importing torch now fails: the folder must not need it\n"
        "import onnxruntime_genai as og\n"
        f"model = og.Model({str(tmp_path)!r})\n"
        "tokenizer = og.Tokenizer(model)\n"
        "prompt = tokenizer.encode('import os\\ndef main(argv):\\n    ')\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(max_length=len(prompt) + 24, do_sample=False)\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(prompt)\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "print(repr(tokenizer.decode(generator.get_sequence(0))))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    prompt = "import os\ndef main(argv):\n    "
    want = _hf_tokens(model, [list(prompt.encode())], 24)[0]
    assert out.stdout.strip() == repr(prompt + bytes(want).decode())


def test_export_genai_errors(tmp_path):
    model = _lm("mixtral")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        moec.export_genai(model, tmp_path / "no-tokenizer", tmp_path / "out")
    with pytest.raises(TypeError, match="decoder LM"):
        moec.export_genai(torch.nn.Linear(2, 2), examples.byte_tokenizer(), tmp_path / "out")
    examples.byte_tokenizer().save_pretrained(str(tmp_path / "tok"))
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    with pytest.raises(ValueError, match="eos"):  # neither the model nor a tokenizer folder say
        moec.export_genai(model, tmp_path / "tok", tmp_path / "out")
    with pytest.raises(NotImplementedError, match="bf16 models are not supported"):
        moec.export_genai(_lm("mixtral").to(torch.bfloat16), tmp_path / "tok", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written (the tokenizer's files were)
