"""The accelprune command: argument errors, one-shot prune and save, the demo on tiny settings."""
import json
import subprocess
import sys

import pytest
import torch

import accelprune
from accelprune import models
from accelprune.cli import main
from accelprune.demo import DemoConfig, run_demo


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--model", "accelprune:resnet20", "--method", "magic", "--out", "x.pt"], "invalid choice"),
        (["prune", "--model", "accelprune:resnet20", "--method", "l1", "--sparsity", "1.5", "--out", "x.pt"],
         "must be in [0, 1)"),
        (["prune", "--model", "accelprune:resnet20", "--method", "l1", "--input-shape", "a,b", "--out", "x.pt"],
         "comma-separated integers"),
        (["prune", "--model", "torchvision:not_a_model", "--method", "l1", "--out", "x.pt"],
         "no classification model"),
        (["prune", "--model", "accelprune:resnet9000", "--method", "l1", "--out", "x.pt"], "has no model"),
        (["prune", "--model", "missing/file.pt", "--method", "l1", "--out", "x.pt"], "neither"),
        (["demo", "--methods", "l1,nope"], "unknown"),
        (["bench", "everything"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_no_traceback(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_file_that_is_not_a_model_is_a_clean_error(tmp_path, capsys):
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", str(bogus), "--method", "l1", "--input-shape", "1,3,32,32",
              "--out", str(tmp_path / "out.pt")])
    assert exit_.value.code == 2
    assert "cannot load" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["reprune", "l1"])
def test_prune_resnet20_saves_a_model_that_loads_back_identically(method, tmp_path, capsys):
    out = tmp_path / f"{method}.pt"
    assert main(["prune", "--model", "accelprune:resnet20", "--method", method, "--sparsity", "0.5",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "params" in printed.lower() and str(out) in printed

    pruned = accelprune.load(out).eval()
    original = models.resnet20().eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pruned(x)
    assert expected.shape == (2, 10)
    # A fresh process loads it with plain accelprune and computes the same outputs.
    script = (
        "import sys, torch, accelprune\n"
        "m = accelprune.load(sys.argv[1]).eval()\n"
        "x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad(): torch.save(m(x), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "y.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_prune_a_saved_model_file_needs_and_uses_an_input_shape(tmp_path, capsys):
    source = tmp_path / "vgg.pt"
    accelprune.save(models.vgg_small(), source)
    out = tmp_path / "pruned.pt"
    assert main(["prune", "--model", str(source), "--method", "l2", "--sparsity", "0.3",
                 "--input-shape", "1,3,32,32", "--out", str(out)]) == 0
    assert accelprune.load(out)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(source), "--method", "l2", "--out", str(out)])
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_prunes_every_method_to_the_budget(tmp_path):
    doc = run_demo(DemoConfig.quick(out_dir=str(tmp_path), progress=False))
    methods = {r["method"]: r for r in doc["methods"]}
    assert set(methods) == {"l1", "bn", "reprune", "csgd"}
    for name in ("reprune", "csgd"):
        assert methods[name]["macs_reduction"] == pytest.approx(0.5, abs=0.03), name
    for r in methods.values():
        assert r["macs"] < doc["base"]["macs"]
        assert 0 <= r["acc_pruned"] <= 1 and 0 <= r["acc_recalibrated"] <= 1
        assert 0 <= r["acc_finetuned"] <= 1
    # the same training after the base model for every method: C-SGD's centripetal epochs count
    config = doc["config"]
    assert methods["l1"]["finetune_epochs"] == config["finetune_epochs"]
    assert methods["csgd"]["finetune_epochs"] == config["finetune_epochs"] - config["csgd_epochs"]
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["methods"] == doc["methods"]
    for png in ("widths.png", "accuracy_vs_macs.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
