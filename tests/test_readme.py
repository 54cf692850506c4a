"""The README's Python examples run as written, and print what the README says they print.

Every ```python block of README.md is found by the section (### heading) it sits in and its index
there. The blocks of one section run in order in one namespace (later blocks use the names of
earlier ones, as a reader would), in a temporary directory (they write files). A block that
cannot run here is listed in EXCLUDED with the reason; the test fails when the README gains,
loses or moves a block without this file following, so no block is left out silently.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# (section, index of the ```python block within it): why it does not run in the test suite.
EXCLUDED = {
    ("REPrune", 1): "slow: 250 scheduled epochs, 77 pruning events on ResNet-56 (~45 s)",
    ("Centripetal SGD", 1): "needs torchrun, NCCL and 4 CUDA GPUs",
    ("2:4 (N:M) semi-structured sparsity", 1): "needs a CUDA GPU of compute capability >= 8.0",
}


def readme_blocks() -> dict[str, list[tuple[int, str, str]]]:
    """{section: [(line, code, the plain ``` block right after it or "")]} in README order."""
    lines = README.read_text(encoding="utf-8").split("\n")
    sections: dict[str, list[tuple[int, str, str]]] = {}
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```python"):
            end = lines.index("```", i + 1)
            code = "\n".join(lines[i + 1:end]) + "\n"
            shown = ""
            after = end + 1
            while after < len(lines) and not lines[after].strip():
                after += 1
            if after < len(lines) and lines[after] == "```":  # a plain block: its output
                close = lines.index("```", after + 1)
                shown = "\n".join(lines[after + 1:close])
            sections.setdefault(section, []).append((i + 1, code, shown))
            i = end
        i += 1
    return sections


BLOCKS = readme_blocks()


# -- what the README says the blocks give ----------------------------------------------------

def check_engines(ns, out, shown):
    assert ns["Z"].shape == (256, 63, 4)
    assert ns["labels"].shape == (256, 64) and ns["labels"].dtype.name == "int32"
    assert len(ns["res"].selected) == 32
    # "every problem cut at the highest of their 32nd merge heights"
    assert ns["cut"].height == ns["Z"][:, 31, 2].max()
    again = ns["accelprune"].cut_linkage(ns["Z"], height=ns["cut"].height)
    assert (ns["cut"].labels == again).all()


def check_reprune(ns, out, shown):
    assert "channels 1008 -> 504 (sparsity 50.0%)" in out
    assert len(ns["kept"]) == 32
    assert sum(ns["counts"]) == sum(ns["widths"]) // 2


def check_csgd(ns, out, shown):
    assert ns["csgd"].pruned
    assert "12 channel groups: 448 -> 224 channels" in out


def check_classic(ns, out, shown):
    assert 0 < ns["sparsity"] < 1
    x, fused, small = ns["x"], ns["fused"].eval(), ns["small"]
    assert isinstance(small.bn1, torch.nn.Identity) and not small.training
    torch.testing.assert_close(small(x), fused(x), rtol=0, atol=0)
    fresh = ns["accelprune"].load("small.pt", ns["resnet20"]())  # an unfused fresh instance too
    torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)


def check_depth(ns, out, shown):
    import torchvision

    blocks = [m for m in ns["model"].modules()
              if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 12  # "16 -> 12 Bottlenecks"
    scores = ns["result"].scores
    assert [scores[n] for n in ns["result"].removed] == sorted(
        scores[n] for n in ns["result"].removed)  # least important first
    assert sum(type(m).__name__ == "SkippedBlock" for m in ns["llm"].modules()) == 2


def check_nm(ns, out, shown):
    report = ns["report"]
    assert report.skipped == {"conv1.weight": "input width 3 is not a multiple of m = 4"}
    assert set(report.pruned.values()) == {0.5} and "fc.weight" in report.pruned


def check_per_layer(ns, out, shown):
    import torchvision

    model = ns["model"]
    widths = {n: m.out_channels for n, m in torchvision.models.resnet18().named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    assert model.layer1[0].conv1.out_channels == 64  # layer_sparsity 0.0
    assert model.layer4[0].conv1.out_channels == 360  # 0.3 of 512: 358.4, rounded up to 8s
    pruned = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels < widths[name]:
            pruned += 1
            assert m.out_channels % 8 == 0, name                  # round_to=8
            assert m.out_channels >= 0.2 * widths[name], name    # max_sparsity=0.8
    assert pruned > 0


def check_plot(ns, out, shown):
    assert Path("importance.png").stat().st_size > 0


def check_saving(ns, out, shown):
    assert ns["model"].layer1[0].conv1.out_channels == 32  # the pruned width came back


def check_resume(ns, out, shown):
    assert ns["pruner"].events and ns["pruner"].events[-1].epoch == 10  # ramp reached t_prune


def check_heads(ns, out, shown):
    attn = ns["model"].layers[0].self_attn
    assert attn.num_heads == 6  # 8 -> 6 heads per layer


def check_llama(ns, out, shown):
    # the three config values, as the README's comments give them ("# 344", "# 4", "# 2")
    code = BLOCKS["A worked example: a tiny LLaMA built from its config"][0][1]
    start = code.index("print(model.config.intermediate_size")
    stated = re.findall(r"#\s*(\d+)\s*$", code[start:], flags=re.M)[:3]
    assert out.split("\n")[0] == " ".join(stated)
    assert out.split("\n")[1] == "torch.Size([1, 24])"  # 16 tokens + 8 new
    assert ns["again"].config.intermediate_size == int(stated[0])


def check_llama_reprune(ns, out, shown):
    assert BLOCKS["REPrune and C-SGD on a tiny LLaMA"][0][2].strip() in out  # the README's table
    assert "q_proj" not in str(ns["pruner"].skipped)
    assert ns["csgd"].pruned
    code = BLOCKS["REPrune and C-SGD on a tiny LLaMA"][1][1]
    before, after = re.search(r"# params ([\d,]+) -> ([\d,]+)", code).groups()
    assert re.search(rf"params\s+{before}\s+{after}", out)  # C-SGD's report, as commented


def check_load_pruned(ns, out, shown):
    assert isinstance(ns["model"], ns["LlamaForCausalLM"])
    sizes = {m.mlp.gate_proj.out_features for m in ns["model"].model.layers}
    assert len(sizes) == 2  # per-layer widths the config cannot describe, loaded back


# (section, block index): the check run right after that block, with (namespace, stdout so far,
# the plain ``` block the README shows after it). Blocks without a check must just run.
CHECKS = {
    ("The engines, functionally", 0): check_engines,
    ("REPrune", 0): check_reprune,
    ("Centripetal SGD", 0): check_csgd,
    ("Classic criteria, masks, schedules, fusion, reports", 0): check_classic,
    ("Depth pruning: removing whole blocks", 1): check_depth,
    ("2:4 (N:M) semi-structured sparsity", 0): check_nm,
    ("Per-layer control in `prune`", 0): check_per_layer,
    ("The importance figure", 0): check_plot,
    ("Saving and loading", 0): check_saving,
    ("Resuming an interrupted run", 0): check_resume,
    ("Transformers and LLMs", 0): check_heads,
    ("Transformers and LLMs", 1): check_load_pruned,
    ("A worked example: a tiny LLaMA built from its config", 0): check_llama,
    ("REPrune and C-SGD on a tiny LLaMA", 1): check_llama_reprune,
}

SECTIONS_WITHOUT_CHECKS = {"Torch-Pruning users"}  # covered by test_reprune's MetaPruner test


def test_every_block_is_run_or_excluded_by_name():
    named = {section for section, _ in CHECKS} | SECTIONS_WITHOUT_CHECKS
    assert set(BLOCKS) == named, (
        "the README's sections with Python blocks changed: update CHECKS / EXCLUDED")
    for section, index in [*EXCLUDED, *CHECKS]:
        assert index < len(BLOCKS[section]), f"no block {section}[{index}] in the README"


@pytest.mark.filterwarnings("ignore::UserWarning")  # some examples warn on purpose
@pytest.mark.parametrize("section", list(BLOCKS))
def test_readme_section(section, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {"__name__": "__readme__"}
    out = ""
    for index, (line, code, shown) in enumerate(BLOCKS[section]):
        if (section, index) in EXCLUDED:
            continue
        exec(compile(code, f"README.md:{line}", "exec"), ns)
        out += capsys.readouterr().out
        check = CHECKS.get((section, index))
        if check is not None:
            check(ns, out, shown)
