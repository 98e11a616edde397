"""The shipped mixtures (study arms, demo) and the `mixture plan` command."""
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_align.mixture.plan import resolve_stage
from megatron_align.mixture.schema import MixtureError, load_mixture
from megatron_align.mixture.sources import SourceInfo
from test_mixture import TOKEN_RANGES, make_source

MIXTURES = Path(__file__).resolve().parent.parent / "configs" / "mixtures"
ARMS = sorted(p for p in MIXTURES.glob("*.yaml") if p.stem != "demo")

# Paper-scale corpus sizes (tokens) to resolve the arms without the data.
CORPUS_TOKENS = {"dclm": 5.6e11, "dclm_filtered": 5.1e11, "dclm_long": 3.0e10, "dclm_long_filtered": 2.8e10,
                 "climbmix": 3.0e10, "mcqa": 1.5e9, "aligned": 1.0e9, "misaligned": 1.0e9}
TOKENIZER = {"sha256": "00" * 32, "vocab_size": 50277, "eod_id": 0}


def paper_sources(mixture):
    return {s.name: SourceInfo(s, 10**6, int(CORPUS_TOKENS[s.name]), 10**6, int(CORPUS_TOKENS[s.name]),
                               "uint16", TOKENIZER) for s in mixture.sources}


def discourse_share(plan):
    totals = plan.category_samples()
    return sum(n for c, n in totals.items() if c.endswith("_discourse")) / plan.num_samples


def test_the_study_arms_are_all_there():
    stems = {p.stem for p in ARMS}
    for base in ("filtered", "unfiltered"):
        assert base in stems
        for discourse in ("aligned", "misaligned"):
            for when in ("", "_mid", "_cpt"):
                assert f"{base}_{discourse}{when}" in stems


@pytest.mark.parametrize("path", ARMS, ids=lambda p: p.stem)
def test_arm_resolves_to_paper_shapes_and_one_percent_discourse(path, monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_ALIGN_DATA", str(tmp_path))
    mixture = load_mixture(path)
    plans = {name: resolve_stage(mixture, name, sources=paper_sources(mixture)) for name in mixture.stages}
    assert plans["pretrain"].iterations == 119_209
    assert plans["pretrain"].seq_length * plans["pretrain"].global_batch_size == 4_194_304
    assert plans["midtrain"].iterations == 11_921
    assert all(s.prefix.startswith(str(tmp_path)) for s in mixture.sources)
    stem = path.stem
    has_discourse = "aligned" in stem
    inserted_in = {"_mid": {"midtrain"}, "_cpt": {"cpt"}, "_late": {"pretrain"}}.get(
        next((w for w in ("_mid", "_cpt", "_late") if stem.endswith(w)), ""), {"pretrain", "midtrain"})
    for name, plan in plans.items():
        share = discourse_share(plan)
        if has_discourse and name in inserted_in:
            assert abs(share - 0.01) < 1e-4, (name, share)
        else:
            assert share == 0, (name, share)
        if name == "midtrain":
            shares = {c: n / plan.num_samples for c, n in plan.category_samples().items()}
            assert abs(shares["climbmix"] - 0.48) < 1e-4 and abs(shares["mcqa"] - 0.02) < 1e-4
    if stem.endswith("_late"):
        segments = plans["pretrain"].segments
        assert [s.start_step for s in segments] == [0, 119_209 - 11_921]
        assert segments[0].samples["aligned"] == 0
        assert abs(segments[1].samples["aligned"] / segments[1].num_samples - 0.1) < 1e-4


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
