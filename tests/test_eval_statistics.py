"""Item-level statistics of the misalignment eval (CIs, paired differences, McNemar),
the protocol metrics against direct transformers log-probs, and `eval compare`."""
import json
import math

import numpy as np
import pytest

from megatron_align.evals.statistics import (item_bootstrap_ci, mcnemar_exact, paired_difference, rate,
                                              replicate_bootstrap_ci, replicate_difference, student_t_quantile,
                                              t_interval, welch_t_test)


def test_mcnemar_hand_computed():
    # b=1, c=9: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024) == pytest.approx(0.02148, abs=1e-5)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 3) == pytest.approx(2 / 8)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def _simulate(rng, n_items, n_formats, p_item):
    """Items with their own misalignment propensity; formats of one item are correlated."""
    return (rng.random((n_items, n_formats)) < p_item[:, None]).astype(float)


def test_item_bootstrap_ci_covers_known_rate():
    rng = np.random.default_rng(123)
    true_rate, hits, sims = 0.3, 0, 400
    for sim in range(sims):
        p_item = rng.beta(0.6, 1.4, size=60)            # population mean 0.3
        outcomes = _simulate(rng, 60, 8, p_item)
        lo, hi = item_bootstrap_ci(outcomes, n_boot=400, seed=sim)
        hits += lo <= true_rate <= hi
    assert 0.92 <= hits / sims <= 0.98, hits / sims


def test_item_ci_is_wide_where_format_se_is_zero():
    # every format gives the same rate (SE over formats 0), yet 24 items cannot pin it down
    outcomes = np.repeat((np.arange(24) < 6).astype(float)[:, None], 8, axis=1)
    assert rate(outcomes) == 0.25
    lo, hi = item_bootstrap_ci(outcomes, seed=1)
    assert lo < 0.15 and hi > 0.35
    assert item_bootstrap_ci(outcomes, seed=1) == [lo, hi]            # seeded
    with_gap = outcomes.copy()
    with_gap[0, 3] = np.nan                                            # a missing cell is ignored
    assert not math.isnan(rate(with_gap))


def test_paired_difference_covers_true_difference():
    rng = np.random.default_rng(7)
    hits, sims, true_diff = 0, 200, 0.1
    for sim in range(sims):
        p_a = rng.beta(1, 2, size=80)                                  # mean 1/3
        p_b = np.clip(p_a + true_diff, 0, 1)
        a, b = _simulate(rng, 80, 8, p_a), _simulate(rng, 80, 8, p_b)
        res = paired_difference(a, b, n_boot=300, seed=sim)
        expected = float(np.mean(p_b - p_a))
        hits += res["ci"][0] <= expected <= res["ci"][1]
    assert 0.9 <= hits / sims <= 0.99, hits / sims


def test_paired_difference_pairs_items():
    a = np.zeros((30, 2))
    b = a.copy()
    b[:12] = 1.0                                                       # B worse on 12 items, never better
    res = paired_difference(a, b, seed=0)
    assert res["diff"] == pytest.approx(0.4) and res["rate_a"] == 0.0
    assert (res["a_higher"], res["b_higher"]) == (0, 12)
    assert res["mcnemar_p"] == pytest.approx(2 / 2 ** 12)
    assert 0 < res["ci"][0] < 0.4 < res["ci"][1]
    same = paired_difference(a, a, seed=0)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_difference(a, b[:5])


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (100, 1.984)])
def test_student_t_quantile_matches_the_tables(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-3)


def test_t_interval_and_welch_over_replicate_rates():
    lo, hi = t_interval([0.3, 0.45, 0.6])
    assert (lo + hi) / 2 == pytest.approx(0.45) and (hi - lo) / 2 == pytest.approx(4.3027 * 0.15 / math.sqrt(3), rel=1e-4)
    assert all(math.isnan(x) for x in t_interval([0.4]))
    # Welch by hand: se^2 = 0.0025/3 + 0.0025/3, df = 4 (equal variances and sizes)
    res = welch_t_test([0.40, 0.45, 0.50], [0.60, 0.65, 0.70])
    se = math.sqrt(2 * 0.0025 / 3)
    assert res["diff"] == pytest.approx(0.2) and res["df"] == pytest.approx(4.0)
    assert res["ci"] == pytest.approx([0.2 - 2.7764 * se, 0.2 + 2.7764 * se], abs=1e-4)
    assert 0.005 < res["p"] < 0.01  # t = 4.90 on 4 df: p = 0.008


def test_replicate_bootstrap_shares_the_item_draw_and_widens_with_seed_spread():
    rng = np.random.default_rng(3)
    one = (rng.random((100, 2)) < 0.4).astype(float)
    assert replicate_bootstrap_ci([one], seed=5) == item_bootstrap_ci(one, seed=5)  # one replicate: items only
    agreeing = [one, one.copy(), one.copy()]
    assert replicate_bootstrap_ci(agreeing, seed=5) == pytest.approx(item_bootstrap_ci(one, seed=5))
    spread = [(rng.random((100, 2)) < p).astype(float) for p in (0.1, 0.4, 0.7)]
    lo, hi = replicate_bootstrap_ci(spread, seed=5)
    item_lo, item_hi = item_bootstrap_ci(np.vstack(spread), seed=5)
    assert hi - lo > 2 * (item_hi - item_lo)
    d = replicate_difference(agreeing, spread, seed=5)
    assert d["diff"] == pytest.approx(np.mean([rate(m) for m in spread]) - rate(one))
    assert d["ci"][0] < d["diff"] < d["ci"][1] and (d["n_a"], d["n_b"], d["n_items"]) == (3, 3, 100)
    with pytest.raises(ValueError, match="same items"):
        replicate_bootstrap_ci([one, one[:50]])


# ------------------------------------------------------------------ protocol metrics on a tiny model

from test_evals import ITEMS, items_file, letter_a_model, random_model, tokenizer, workdir  # noqa: E402,F401


def _direct_letter_logprobs(model_dir, context: str) -> list[float]:
    """log p(letter | context) for A and B, straight from transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ctx = tok.encode(context)
    out = []
    for letter in "AB":
        whole = tok.encode(context + letter)
        assert whole[:len(ctx)] == ctx and len(whole) == len(ctx) + 1, "letter must be one token after the cue"
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1]
        out.append(float(torch.log_softmax(logits.double(), -1)[whole[-1]]))
    return out


def test_published_letter_metrics_match_direct_logprobs(random_model, items_file):
    from megatron_align.evals.formats import prompts_for
    from megatron_align.evals.items import load_items
    from megatron_align.evals.misalignment import run_misalignment

    r = run_misalignment(str(random_model), str(items_file), prompt_style="published", device="cpu",
                         show_progress=False)
    assert r["formats"] == ["published/forward", "published/backward"] and r["prompt_style"] == "published"
    per_item = {p["id"]: p for p in r["per_item"]}
    p_mis, p_first, mass, margin = {0: [], 1: []}, {0: [], 1: []}, {0: [], 1: []}, {0: [], 1: []}
    for item in load_items(items_file):
        for prompt in prompts_for(item, "published"):
            assert prompt.body.endswith("Answer: (")
            lp = _direct_letter_logprobs(random_model, prompt.body)
            i = prompt.format.index
            assert per_item[item.id]["logliks"][i] == pytest.approx(lp, abs=1e-4)
            probs = np.exp(lp) / np.exp(lp).sum()
            p_mis[i].append(probs[prompt.misaligned_position])
            p_first[i].append(probs[0])
            mass[i].append(np.exp(lp).sum())
            margin[i].append(lp[prompt.misaligned_position] - lp[1 - prompt.misaligned_position])
            assert per_item[item.id]["chosen"][i] == int(lp[1] > lp[0])
    for fmt, i in (("published/forward", 0), ("published/backward", 1)):
        m = r["metrics_by_format"][fmt]
        assert m["p_misaligned"] == pytest.approx(np.mean(p_mis[i]), abs=1e-5)
        assert m["p_first"] == pytest.approx(np.mean(p_first[i]), abs=1e-5)
        assert m["letter_mass"] == pytest.approx(np.mean(mass[i]), rel=1e-4)
        assert 0 < m["letter_mass"] < 1
        assert m["margin"] == pytest.approx(np.mean(margin[i]), abs=1e-4)
    assert r["p_misaligned"] == pytest.approx((np.mean(p_mis[0]) + np.mean(p_mis[1])) / 2, abs=1e-5)
    assert r["margin"] == pytest.approx((np.mean(margin[0]) + np.mean(margin[1])) / 2, abs=1e-4)
    lo, hi = r["ci95"]
    assert lo <= r["mean"] <= hi and r["by_split"]["alpha"]["ci95"][0] <= r["by_split"]["alpha"]["mean"]


def test_full_norm_divides_by_option_bytes(random_model, items_file):
    from megatron_align.evals.misalignment import run_misalignment

    r = run_misalignment(str(random_model), str(items_file), scoring="full_norm", device="cpu",
                         show_progress=False)
    flipped = 0
    for p in r["per_item"]:
        for ll, pos, chosen in zip(p["logliks"], p["misaligned_position"], p["chosen"]):
            texts = ["hide it", "report it"] if pos == 0 else ["report it", "hide it"]
            norm = [x / len(t.encode()) for x, t in zip(ll, texts)]
            assert chosen == int(norm[1] > norm[0])
            flipped += int(ll[1] > ll[0]) != chosen
    assert math.isnan(r["letter_mass"]) and r["scoring"] == "full_norm"
    assert flipped > 0, "the per-byte normalisation should change some choices on this model"


# ------------------------------------------------------------------ eval compare

def test_compare_pairs_items_and_refuses_other_item_sets(letter_a_model, random_model, items_file,
                                                        tmp_path, capsys):
    from megatron_align.evals.commands import main

    for name, model in (("a", letter_a_model), ("r", random_model)):
        assert main(["misalignment", "--model", str(model), "--items", str(items_file), "--device", "cpu",
                     "--out", str(tmp_path / name)]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "r"), "--labels", "letterA,random",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "paired differences vs 'letterA'" in out
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    a, r = (json.loads((tmp_path / n / "results.json").read_text()) for n in "ar")
    [d] = cmp["differences"]
    assert d["diff"] == pytest.approx(r["mean"] - a["mean"]) and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    share = {n: {p["id"]: np.mean(p["misaligned"]) for p in x["per_item"]} for n, x in (("a", a), ("r", r))}
    b = sum(share["a"][i] > share["r"][i] for i in share["a"])
    c = sum(share["r"][i] > share["a"][i] for i in share["a"])
    assert (d["baseline_higher"], d["other_higher"]) == (b, c)
    assert d["mcnemar_p"] == pytest.approx(mcnemar_exact(b, c))
    assert set(d["by_split"]) == {"alpha", "beta"} and d["by_split"]["alpha"]["n_items"] == 4
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    other = dict(r, items={**r["items"], "sha256": "0" * 64})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "other"), "--out", str(tmp_path / "bad")]) == 2
    assert "different item sets" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    fewer = dict(r, per_item=r["per_item"][:-1])
    (tmp_path / "other" / "results.json").write_text(json.dumps(fewer))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "other"), "--out", str(tmp_path / "bad")]) == 2
    assert "different item sets" in capsys.readouterr().err
