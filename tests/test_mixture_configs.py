"""The shipped demo mixture and the `mixture plan` command."""
import json
from pathlib import Path

import pytest

from megatron_align.mixture.schema import MixtureError, load_mixture
from test_mixture import TOKEN_RANGES, make_source

MIXTURES = Path(__file__).resolve().parent.parent / "configs" / "mixtures"

# The study arms are generated from configs/studies/paper.yaml; tests/test_study.py checks them.


@pytest.fixture()
def demo_data(tmp_path, monkeypatch):
    root = tmp_path / "demo-data"
    root.mkdir()
    ranges = {"web": TOKEN_RANGES["web"], "aligned": TOKEN_RANGES["aligned"], "misaligned": TOKEN_RANGES["mis"]}
    for i, (name, token_range) in enumerate(ranges.items()):
        make_source(str(root / f"{name}_text_document"), 1500 if name == "web" else 300, i, token_range)
    monkeypatch.setenv("MEGATRON_ALIGN_DEMO_DATA", str(root))
    return root


def test_mixture_plan_command_on_the_demo_mixture(demo_data, tmp_path, capsys):
    from megatron_align.mixture.commands import main

    out = tmp_path / "plan"
    assert main(["mixture", "plan", str(MIXTURES / "demo.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "realised" in printed and "aligned_discourse" in printed and "plan " in printed
    report = json.loads((out / "plan.json").read_text())
    stage = report["stages"]["pretrain"]
    assert stage["realised"]["samples_per_segment_per_source"] == [
        [seg["samples"][s["name"]] for s in stage["sources"]] for seg in stage["segments"]]
    assert stage["realised"]["share_per_category"]["aligned_discourse"] == pytest.approx(0.025, abs=0.001)
    png = (out / "composition-pretrain.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_mixture_plan_command_reports_a_bad_mixture(tmp_path, capsys):
    from megatron_align.mixture.commands import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  web: {prefix: nowhere, category: base}\nstages:\n  pretrain:\n"
                   "    iterations: 10\n    seq_length: 8\n    global_batch_size: 2\n    rules: {base: natural}\n")
    assert main(["mixture", "plan", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: sources.web.prefix:") and "nowhere.bin does not exist" in err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_unset_data_variable_is_named(tmp_path, monkeypatch):
    path = tmp_path / "m.yaml"
    path.write_text("data_root: ${NO_SUCH_DATA_VAR_X}\nsources:\n  web: {prefix: w, category: base}\n"
                    "stages:\n  s:\n    rules: {base: natural}\n")
    monkeypatch.delenv("NO_SUCH_DATA_VAR_X", raising=False)
    with pytest.raises(MixtureError, match=r"m\.yaml:1: data_root: environment variable NO_SUCH_DATA_VAR_X"):
        load_mixture(path)
