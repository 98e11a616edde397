"""SDPA core attention against megatron-core's DotProductAttention (model.attention_backend)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import losses, run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.cpu_only(reason="gloo ranks sharing one CPU, fp32")]

WORKER = Path(__file__).with_name("attention_numerics_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def numerics(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "numerics.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(WORKER), str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["gpt-neox-tp1", "llama-tp1", "gpt-neox-tp2", "llama-tp2"])
def test_sdpa_matches_dot_product_attention(numerics, case):
    """Same weights and tokens through the whole GPTModel: logits, loss and every parameter's
    gradient agree to 1e-5 (fp32) on every rank; llama runs grouped-query attention."""
    for rank in numerics:
        got = rank[case]
        assert (got["core_attention"], got["reference_attention"]) == ("SDPAttention", "DotProductAttention")
        assert got["grad_scale"] > 1e-3, "gradients too small to compare"
        assert got["logits"] <= TOLERANCE and got["loss"] <= TOLERANCE and got["grads"] <= TOLERANCE, got


def test_sdpa_attention_dropout_is_reproducible_and_train_only(numerics):
    got = numerics[0]["dropout"]
    assert got["train_repeat"] == 0.0  # same model-parallel RNG seed, same mask
    assert got["train_vs_eval"] > 0.1


def test_training_trajectory_matches_megatron_backend(tmp_path):
    common = ["train.iterations=6", "train.global_batch_size=4", "train.micro_batch_size=2",
              "optim.lr=0.01", "optim.warmup_iters=1", "logging.progress_bar=false",
              "logging.tensorboard=false", "checkpoint.save_at_end=false", "model.preset=llama"]
    runs = {}
    for backend in ("sdpa", "megatron"):
        run_cli("train", f"run_dir={tmp_path / backend}", f"model.attention_backend={backend}", *common)
        runs[backend] = losses(tmp_path / backend)
    assert len(runs["sdpa"]) == 6
    assert runs["megatron"][0] - runs["megatron"][-1] > 0.05, "did not train"
    assert runs["sdpa"] == pytest.approx(runs["megatron"], abs=1e-5)


def test_te_backend_without_transformer_engine_is_a_config_error():
    from megatron_align.config import ConfigError, load_run_config
    from megatron_align.parallel.layout import check_run_config

    for impl in ("local", "auto"):  # no TE on this machine: auto means local layers here
        config = load_run_config(None, ["model.attention_backend=te", f"model.transformer_impl={impl}"])
        with pytest.raises(ConfigError, match="command line: model.attention_backend: te needs "
                                              "TransformerEngine layers"):
            check_run_config(config, 1)
