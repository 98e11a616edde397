"""Micro-batch assembly: which keys each pipeline stage builds, and that they match the full batch."""
import torch

from megatron_align.data.builders import SyntheticDataset
from megatron_align.parallel.layout import ParallelLayout
from megatron_align.training.batches import BATCH_KEYS, stage_keys, step_microbatches


def test_each_pipeline_stage_builds_only_the_keys_it_reads():
    assert stage_keys(first_stage=True, last_stage=True) == BATCH_KEYS
    assert stage_keys(first_stage=True, last_stage=False) == ("tokens", "position_ids")
    assert stage_keys(first_stage=False, last_stage=True) == ("labels", "loss_mask", "position_ids")
    assert stage_keys(first_stage=False, last_stage=False) == ("position_ids",)


def test_a_stage_batch_equals_the_full_batch_on_its_keys():
    dataset = SyntheticDataset(64, seq_length=16, vocab_size=97, seed=3)
    layout = ParallelLayout(world_size=4, tensor=1, pipeline=2, virtual_pipeline=None, data=2,
                            micro_batch_size=2, global_batch_size=8)
    full = step_microbatches(dataset, layout, consumed=8, dp_rank=1, device=torch.device("cpu"))
    for first, last in ((True, False), (False, True), (False, False)):
        keys = stage_keys(first, last)
        staged = step_microbatches(dataset, layout, consumed=8, dp_rank=1, device=torch.device("cpu"),
                                   keys=keys)
        assert len(staged) == len(full) == layout.num_microbatches
        for part, whole in zip(staged, full):
            assert tuple(part) == keys
            for key in keys:
                assert torch.equal(part[key], whole[key])
