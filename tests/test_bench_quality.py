"""bench_quality's bookkeeping (the runs themselves take minutes: run the benchmark's --quick)."""
import pytest

from benchmarks.bench_quality import METHODS, Config, merge, plot, summarize, tables


def _doc(seed: int, acc: float) -> dict:
    runs = [{"seed": seed, "budget": b, "method": m, "macs": int(1e6 * (1 - b)), "params": 100,
             "macs_reduction": b, "acc_oneshot": 0.1, "acc_recal": acc - 0.2,
             "acc_finetuned": acc} for b in (0.5, 0.8) for m in METHODS]
    swaps = [{"seed": seed, "budget": 0.8, "method": "reprune_sel@l1_widths", "macs": 200000,
              "params": 90, "macs_reduction": 0.8, "acc_oneshot": 0.1, "acc_recal": 0.5,
              "acc_finetuned": acc}]
    schedule = [{"seed": seed, "budget": 0.8, "method": "reprune_schedule", "macs": 201000,
                 "params": 80, "macs_reduction": 0.799, "acc_finetuned": acc}]
    doc = {"config": {**Config().__dict__, "seeds": [seed]}, "date": "d", "seconds": 1.0,
           "base": [{"seed": seed, "acc": 0.9, "macs": 1e6, "params": 500}], "runs": runs,
           "swaps": swaps, "schedule": schedule, "gamma": []}
    doc["summary"] = summarize(doc)
    return doc


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    doc = merge([_doc(0, 0.8), _doc(1, 0.9)])
    assert doc["config"]["seeds"] == [0, 1]
    mean, std = doc["summary"]["l1"]["0.8"]["acc_finetuned"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-5)
    assert doc["summary"]["reprune_schedule"]["0.8"]["acc_finetuned"][0] == pytest.approx(0.85)
    text = tables(doc)
    assert "85.0 ± 7.1" in text and "-80% MACs" in text
    plot(doc, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_refuses_different_configurations():
    other = _doc(1, 0.9)
    other["config"]["base_epochs"] += 1
    with pytest.raises(ValueError, match="base_epochs"):
        merge([_doc(0, 0.8), other])
