"""The `moec` console script, invoked in a subprocess as a user would: on an HF folder written by save_pretrained,
a factory module in a temp dir, and built-ins; bad input ends in one line that says what to do (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from moec import examples, models

MOEC = str(Path(sys.executable).parent / "moec")


def moec(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([MOEC, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    models.tiny_model("qwen2_moe").save_pretrained(folder)
    examples.byte_tokenizer().save_pretrained(folder)
    return folder


def test_inspect_an_hf_folder_as_json(hf_folder):
    r = moec("inspect", hf_folder, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [b["path"] for b in report["blocks"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    b = report["blocks"][0]
    assert (b["num_experts"], b["top_k"]) == (8, 2) and "shared_expert" in b["shared"]
    assert sum(b["expert_load"]) == 2 * 8 * 2 and report["rejected"] == []  # example inputs: 2 x 8 tokens, k=2


def test_run_a_factory_with_instruments(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from moec import models\n"
        "def build():\n"
        "    m = models.tiny_model('olmoe')\n"
        "    return m, models.example_inputs(m, batch=2, seq=6)\n")
    r = moec("run", "my_models:build", "--verify", "--print-after", "fuse_gate", "--dump", tmp_path / "dump",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "numeric error after each pass" in r.stdout and "moec.route" in r.stdout + r.stderr
    dumped = sorted(p.name for p in (tmp_path / "dump" / "model.layers.0.mlp").iterdir())
    assert dumped == ["000_detect_moe.py", "001_fuse_gate.py", "002_batch_experts.py"]
    r = moec("inspect", tmp_path / "my_models.py:build")  # the same factory as a file path
    assert r.returncode == 0 and "model.layers.1.mlp" in r.stdout


def test_routing_of_a_builtin_with_its_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    r = moec("routing", "tiny_moe_lm", "--text", text, "--png", tmp_path / "r.png")
    assert r.returncode == 0, r.stderr
    assert "top-2 mass" in r.stdout and f"{len(text.read_bytes())} tokens" in r.stdout
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_export_an_hf_folder(hf_folder, tmp_path):
    r = moec("export", hf_folder, tmp_path / "m.onnx", "--quantize", "int4:g32:a8")
    assert r.returncode == 0, r.stderr
    qmoe = [n for n in onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.node if n.op_type == "QMoE"]
    assert qmoe and all(onnx.helper.get_attribute_value(a) == 4 for n in qmoe for a in n.attribute
                        if a.name == "accuracy_level")  # int8 activations
    assert all(any(a.name == "accuracy_level" for a in n.attribute) for n in qmoe)
    r = moec("export", hf_folder, tmp_path / "genai", "--genai")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "genai" / "genai_config.json").is_file() and (tmp_path / "genai" / "tokenizer.json").is_file()
    assert "slices" in r.stdout  # fp experts sliced for ORT's CPU kernel by default


@pytest.mark.slow
def test_export_whole_experts(hf_folder, tmp_path):
    r = moec("export", hf_folder, tmp_path / "whole.onnx", "--expert-slices", "1")
    assert r.returncode == 0, r.stderr
    assert "slices" not in r.stdout and "MoE" in r.stdout


@pytest.mark.parametrize("args, says", [
    (("inspect", "no_such_model"), "is not a folder with config.json"),
    (("run", "mixtral", "--print-after", "quantize_experts"), "not a pass of the pipeline"),
    (("run", "mixtral", "--passes", "fuse_gate"), "starts with detect_moe"),
    (("export", "mixtral", "out.onnx", "--quantize", "int5"), "write int8, int4:gG, or either with :a8"),
    (("routing", "mixtral", "--text", "README.md"), "no tokenizer"),
    (("inspect", "no_such_module:build"), "No module named"),
])
def test_bad_input_is_one_line_that_says_what_to_do(args, says, tmp_path):
    r = moec(*args, cwd=Path(__file__).parent.parent)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moec: error:") and says in lines[0], r.stderr


def test_help_shows_an_example():
    r = moec("routing", "--help")
    assert r.returncode == 0 and "example:" in r.stdout and "moec routing fine_moe_lm" in r.stdout
    m = subprocess.run([sys.executable, "-m", "moec", "routing", "--help"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "200"})
    assert m.returncode == 0 and m.stdout == r.stdout  # python -m moec: the same command


def test_run_an_approximation_reports_its_error_not_a_failure():
    r = moec("run", "mixtral", "--topk", "1", "--verify")
    assert r.returncode == 0, r.stderr
    assert "1*" in r.stdout and "approximate, top-1 of 2: max relative error" in r.stdout
    assert "numbers changed" not in r.stdout and "reduce_topk: an approximation" in r.stdout
    r = moec("run", "mixtral", "--top-p", "0.6")
    assert r.returncode == 0 and "approximate, top-p 0.6 (k 1..2) of top-2" in r.stdout, r.stdout + r.stderr
    r = moec("run", "mixtral", "--top-p", "1.5")
    assert r.returncode == 2 and "is not a number in (0, 1]" in r.stderr


def test_bench_a_builtin():
    r = moec("bench", "mixtral", "--tokens", "1", "4", "--rounds", "1", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    for system in ("HF experts_implementation='eager'", "HF experts_implementation='moec'", "moec.compile",
                   "moec.compile backend='onnxruntime'", "moec.compile quantize=int8"):
        assert system in r.stdout
    assert "4 token(s)" in r.stdout


@pytest.mark.parametrize("factory, says", [
    ("def build():\n    return 3\n", "must return a torch.nn.Module or (module, {input name: tensor})"),
    ("import torch\ndef build():\n    return torch.nn.Linear(2, 2), (torch.ones(2),)\n", "must return a torch.nn.Module"),
    ("def other():\n    pass\n", "has no function 'build'"),
    ("build = 5\n", "fac.py:build is not a function (int)"),
    ("import torch\ndef build():\n    return torch.nn.Identity()\n", "Identity, a module without parameters"),
])
def test_a_bad_factory_is_one_line(factory, says, tmp_path):
    (tmp_path / "fac.py").write_text(factory)
    r = moec("inspect", "fac.py:build", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


RAISING = '''
import torch
from moec import models
from moec.pass_manager import register_pass
import helper_of_mine  # a module beside the file: importable, as when the file runs


@register_pass("raises", requires=("fuse_gate",))
def raises(gm):
    raise RuntimeError("a bug in my pass")


def build():
    return models.tiny_model("qwen2_moe")


def broken():
    return {}["no such key"]
'''


def test_an_error_in_the_users_own_code_shows_its_traceback(tmp_path):
    """A factory, a module it imports, or a pass that raises: the traceback and exit status 1 (it was one line and
    exit status 2, or exit status 0 for a pass under run --verify), as docs/cli.md says."""
    (tmp_path / "helper_of_mine.py").write_text("X = 1\n")
    (tmp_path / "mine.py").write_text(RAISING)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = moec("inspect", tmp_path / "mine.py:broken", cwd=elsewhere)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'no such key'" in r.stderr, r.stderr
    assert "mine.py:broken raised KeyError (the traceback above)" in r.stderr
    (tmp_path / "bad_import.py").write_text("import no_such_module_anywhere\ndef build():\n    pass\n")
    r = moec("inspect", "bad_import.py:build", cwd=tmp_path)
    assert r.returncode == 1 and "No module named 'no_such_module_anywhere'" in r.stderr, r.stderr
    r = moec("bisect", "mine.py:build", "--passes", "detect_moe,fuse_gate,raises", "--out", tmp_path / "o",
             cwd=tmp_path)
    assert r.returncode == 1 and "RuntimeError: a bug in my pass" in r.stderr and "Traceback" in r.stderr, r.stderr
    r = moec("run", "mine.py:build", "--passes", "detect_moe,fuse_gate,raises", "--verify", cwd=tmp_path)
    assert r.returncode == 1 and "a bug in my pass" in r.stdout, r.stdout + r.stderr
    r = moec("inspect", "no_such_module:build", cwd=tmp_path)  # a wrong name is bad input: one line
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "mymodel.py").write_text("import my\ndef build():\n    pass\n")  # its own import fails: its code
    r = moec("inspect", "mymodel:build", cwd=tmp_path)
    assert r.returncode == 1 and "No module named 'my'" in r.stderr and "Traceback" in r.stderr, r.stderr


HAND_WRITTEN = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, H=32, E=4):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, 48), nn.ReLU(), nn.Linear(48, H)) for _ in range(E))

    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (ids == e).nonzero(as_tuple=True)
            out[rows] += expert(x[rows]) * w[rows, slot, None]
        return out


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), Block()).eval(), {"input": torch.randn(6, 16)}
'''


def test_a_hand_written_block_from_a_factory_file_bisects_and_replays_anywhere(tmp_path):
    """Its class lives in the factory file: block.pt pickles it by the file's name (it failed to pickle), and the
    reproducer carries the file (code/) so that replay runs in any directory (it failed: No module named ...)."""
    (tmp_path / "mymodel.py").write_text(HAND_WRITTEN)
    (tmp_path / "broken.py").write_text(BROKEN_PASS.replace("FACTOR", "1.01").replace(
        "return models.tiny_model(\"qwen2_moe\")", "import mymodel\n    return mymodel.build()"))
    r = moec("bisect", "broken.py:build", "--passes", "detect_moe,fuse_gate,break_numbers,batch_experts",
             "--out", tmp_path / "repro", cwd=tmp_path)
    assert r.returncode == 1 and "numbers changed at pass 'break_numbers'" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "repro" / "block" / "code" / "mymodel.py").is_file()
    r = moec("replay", tmp_path / "repro" / "block", cwd="/")
    assert r.returncode == 1 and "numbers changed at pass 'break_numbers'" in r.stdout, r.stdout + r.stderr


def test_routing_of_a_seq2seq_model_uses_its_example_inputs_and_topk_checks():
    r = moec("routing", "switch_transformers")
    assert r.returncode == 0, r.stderr
    assert "moec routing:" in r.stdout
    for flag in (("run", "mixtral", "--topk", "0"), ("routing", "mixtral", "--random", "0")):
        r = moec(*flag)
        assert r.returncode == 2 and "is not an integer >= 1" in r.stderr
    r = moec("run", "mixtral", "--topk", "1", "--print-after", "reduce_topk")
    assert r.returncode == 0 and "graph after reduce_topk" in r.stdout + r.stderr
    assert "left exact" not in r.stdout
    r = moec("run", "mixtral", "--topk", "5")  # above the blocks' k = 2: said, not silently exact
    assert r.returncode == 0 and "--topk 5: at or above every block's own k" in r.stdout, r.stdout


BROKEN_PASS = '''
import torch
from moec import models
from moec.pass_manager import PassResult, register_pass


@register_pass("break_numbers", requires=("fuse_gate",))
def break_numbers(gm):  # scales the block's output by FACTOR: a pass that changes the numbers
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = out.args[0]
    first = vals[0] if isinstance(vals, (tuple, list)) else vals
    with gm.graph.inserting_before(out):
        bad = gm.graph.call_function(torch.mul, (first, FACTOR))
    out.args = ((bad, *vals[1:]),) if isinstance(vals, (tuple, list)) else (bad,)
    gm.recompile()
    return PassResult(gm, True, {})


def build():
    return models.tiny_model("qwen2_moe")
'''


FACTORS = ["1.01", "float('nan')"]  # a NaN output was measured as no change (max() keeps the first of a NaN pair)


@pytest.mark.parametrize("factor", FACTORS)
def test_bisect_names_a_broken_pass_and_its_reproducer_replays(tmp_path, factor):
    (tmp_path / "broken.py").write_text(BROKEN_PASS.replace("FACTOR", factor))
    out = tmp_path / "repro"
    r = moec("bisect", "broken.py:build", "--passes", "detect_moe,fuse_gate,break_numbers,batch_experts",
             "--out", out, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "numbers changed at pass 'break_numbers'" in r.stdout and "model.layers.0.mlp" in r.stdout
    meta = json.loads((out / "block" / "meta.json").read_text())
    assert meta["first_changed"] == "break_numbers" and meta["block"] == "model.layers.0.mlp"
    files = {p.name for p in (out / "block").iterdir()}
    assert {"block.pt", "block.safetensors", "spec.txt", "inputs.safetensors", "errors.txt"} <= files
    assert "MoESpec(" in (out / "block" / "spec.txt").read_text()
    stages = sorted(p.name for p in (out / "block" / "stages").iterdir())
    assert stages == ["000_detect_moe.py", "001_fuse_gate.py", "002_break_numbers.py", "003_batch_experts.py"]
    r = moec("replay", out / "block", cwd="/")  # another directory, a fresh process: only the folder
    assert r.returncode == 1 and "numbers changed at pass 'break_numbers'" in r.stdout, r.stdout + r.stderr
    r = moec("bisect", "mixtral", "--out", tmp_path / "none")
    assert r.returncode == 0 and "no pass of detect_moe,fuse_gate,batch_experts changed the numbers" in r.stdout


@pytest.mark.parametrize("factor", FACTORS)
def test_run_verify_names_a_broken_pass_whose_blocks_the_final_proof_rejected(tmp_path, factor):
    """The final proof rejects the blocks a pass broke: run --verify still names the pass and exits 1, and the
    rejection blames the user's pass, not moec."""
    (tmp_path / "broken.py").write_text(BROKEN_PASS.replace("FACTOR", factor))
    r = moec("run", "broken.py:build", "--passes", "detect_moe,fuse_gate,break_numbers,batch_experts", "--verify",
             cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "model.layers.0.mlp: numbers changed at pass 'break_numbers'" in r.stdout
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "['break_numbers']" in text and "please report" not in text


def test_bisect_dumps_rejected_candidates(tmp_path):
    (tmp_path / "rej.py").write_text(
        "from moec import models\n"
        "def build():\n"
        "    return models.tiny_model('nllb_moe')\n")
    r = moec("bisect", "rej.py:build", "--dump-rejected", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dumped = list((tmp_path / "out" / "rejected").iterdir())
    assert dumped and all((d / "block.pt").is_file() and (d / "reason.txt").read_text().strip() for d in dumped)
