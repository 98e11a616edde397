"""The blending layer: mixture YAML -> exact per-window megatron-core blends + composition report."""
from megatron_align.mixture.plan import MixturePlan, resolve_stage, stage_iterations
from megatron_align.mixture.schema import Mixture, MixtureError, load_mixture

__all__ = ["Mixture", "MixtureError", "MixturePlan", "load_mixture", "resolve_stage", "stage_iterations"]
