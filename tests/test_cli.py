"""The accelprune command: argument errors, one-shot prune and save, the demo on tiny settings."""
import json
import os
import subprocess
import sys

import pytest
import torch

import accelprune
from accelprune import models
from accelprune.cli import main
from accelprune.demo import DemoConfig, run_demo

_R20 = ["--model", "accelprune:resnet20"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", *_R20, "--method", "magic", "--out", "x.pt"], "invalid choice"),
        (["prune", *_R20, "--method", "l1", "--sparsity", "1.5", "--out", "x.pt"],
         "must be in [0, 1)"),
        (["prune", *_R20, "--method", "l1", "--input-shape", "a,b", "--out", "x.pt"],
         "comma-separated integers"),
        (["prune", "--model", "torchvision:not_a_model", "--method", "l1", "--out", "x.pt"],
         "no classification model"),
        (["prune", "--model", "accelprune:resnet9000", "--method", "l1", "--out", "x.pt"],
         "has no model"),
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
    assert (sum(p.numel() for p in pruned.parameters())
            < sum(p.numel() for p in original.parameters()))
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


def test_prune_a_saved_model_file_takes_its_constructor_and_input_shape(tmp_path, capsys):
    source = tmp_path / "vgg.pt"
    accelprune.save(models.vgg_small(), source)  # names accelprune:VGGSmall
    out = tmp_path / "pruned.pt"
    assert main(["prune", "--model", str(source), "--method", "l2", "--sparsity", "0.3",
                 "--out", str(out)]) == 0
    assert accelprune.load(out)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # a file the CLI wrote is a valid --model too: prune it again, no pickle involved
    again = tmp_path / "again.pt"
    assert main(["prune", "--model", str(out), "--method", "l1", "--sparsity", "0.3",
                 "--input-shape", "1,3,32,32", "--out", str(again)]) == 0
    assert sum(p.numel() for p in accelprune.load(again).parameters()) < sum(
        p.numel() for p in accelprune.load(out).parameters())


def test_a_file_without_a_constructor_is_refused_in_one_line(tmp_path, capsys):
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    source = tmp_path / "custom.pt"
    accelprune.save(Custom(), source)
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", str(source), "--method", "l1", "--input-shape", "1,3",
              "--out", str(tmp_path / "o.pt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "names no constructor" in err and len(err.strip().splitlines()) == 1


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_that_runs_a_command_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "accelprune.model", "version": 1, "model": _RunsCommand(marker)}, evil)
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", str(evil), "--method", "l1", "--input-shape", "1,3,32,32",
              "--out", str(tmp_path / "o.pt")])
    assert exit_.value.code == 2
    assert "pickled" in capsys.readouterr().err
    assert not marker.exists()


def test_an_old_pickled_model_file_needs_allow_pickle(tmp_path, capsys):
    old = tmp_path / "old.pt"
    torch.save({"format": "accelprune.model", "version": 1, "model": models.vgg_small()}, old)
    out = tmp_path / "new.pt"
    args = ["prune", "--model", str(old), "--method", "l1", "--sparsity", "0.2",
            "--input-shape", "1,3,32,32", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "--allow-pickle" in capsys.readouterr().err
    assert main([*args, "--allow-pickle"]) == 0
    assert accelprune.load(out)(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # now weights-only


def _prune_args(tmp_path, *extra, out=None):
    out = str(tmp_path / "o.pt") if out is None else out
    return ["prune", "--model", "accelprune:resnet20", "--method", "l1", "--out", out, *extra]


@pytest.mark.parametrize("case, message", [
    ("empty", "--out is empty"),
    ("directory", "is a directory"),
    ("missing_dir", "does not exist"),
    ("parent_is_file", "is not a directory"),
    ("unwritable", "cannot be written"),
])
def test_bad_out_paths_are_refused_before_any_work(case, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    out = {"empty": "", "directory": str(tmp_path), "missing_dir": str(tmp_path / "no" / "o.pt"),
           "parent_is_file": str(tmp_path / "file.txt" / "o.pt"),
           "unwritable": "/proc/accelprune-test/o.pt" if os.geteuid() == 0 else None}[case]
    if case == "unwritable" and out is None:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = str(locked / "o.pt")
    if case == "unwritable" and os.geteuid() == 0:
        out = "/proc/o.pt"  # root may write anywhere else
    import accelprune.cli as cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_work)
    with pytest.raises(SystemExit) as exit_:
        main(_prune_args(tmp_path, out=out))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file.txt"] + (["locked"] if (tmp_path / "locked").exists() else []))


@pytest.mark.parametrize("extra, message", [
    (["--input-shape", "1,3,100000,100000"], "GB for the input tensor"),
    (["--input-shape", "1000000,1000000,1000000,1000000"], "GB for the input tensor"),
    (["--num-classes", "0"], "must be >= 1"),
    (["--num-classes", "-3"], "must be >= 1"),
    (["--seed", str(2**70)], "must be in [0, 2**32 - 1]"),
    (["--seed", "-1"], "must be in [0, 2**32 - 1]"),
    (["--sparsity", "0.3", "--macs", "0.5"], "not allowed with argument"),
    (["--macs", "1.0"], "must be in [0, 1)"),
    (["--nm", "4:2"], "need 1 <= N < M"),
    (["--nm", "two:four"], "expected N:M"),
])
def test_bad_numbers_exit_2_in_one_line(extra, message, tmp_path, capsys, monkeypatch):
    import accelprune.cli as cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_work)
    with pytest.raises(SystemExit) as exit_:
        main(_prune_args(tmp_path, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.pt").exists()


def test_demo_refuses_a_file_as_its_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "f"), "--quick"])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--seed", str(2**70)])


def test_prune_to_a_macs_reduction(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["prune", "--model", "accelprune:vgg_small", "--method", "l1", "--macs", "0.4",
                 "--out", str(out)]) == 0
    assert "removes 40% of the MACs" in capsys.readouterr().out
    x = torch.randn(1, 3, 32, 32)
    before = accelprune.model_stats(models.vgg_small(), x)["macs"]
    after = accelprune.model_stats(accelprune.load(out), x)["macs"]
    assert after / before == pytest.approx(0.6, abs=0.03)


def test_prune_then_two_four_sparsity(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["prune", "--model", "accelprune:resnet20", "--method", "l1", "--sparsity", "0.25",
                 "--nm", "2:4", "--out", str(out)]) == 0
    assert "2:4 sparsity on" in capsys.readouterr().out
    model = accelprune.load(out)
    conv = model.layer2[0].conv1  # its input width (a multiple of 4) is grouped in fours
    w = conv.weight.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((w != 0).sum(1) <= 2).all()


def test_num_classes_is_kept_in_the_saved_constructor(tmp_path):
    from accelprune.cli import load_model

    model, shape, constructor = load_model("accelprune:resnet20", 7)
    assert shape == (1, 3, 32, 32) and model.fc.out_features == 7
    path = tmp_path / "m.pt"
    accelprune.save(model, path, constructor=constructor["name"],
                    constructor_kwargs=constructor["kwargs"])
    assert accelprune.load(path)(torch.randn(1, 3, 32, 32)).shape == (1, 7)


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
