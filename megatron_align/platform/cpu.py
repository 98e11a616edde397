"""Run megatron-core's own GPTModel, schedules, DDP, optimizer and checkpointing on CPU/gloo.

megatron-core assumes CUDA in a few dozen call sites: literal ``device="cuda"`` allocations,
``torch.cuda.current_device()`` as a device, ``.cuda()`` moves, ``torch.cuda.synchronize()``,
``'torch.cuda.FloatTensor'`` type checks and the CUDA RNG tracker. On a machine without CUDA we
redirect exactly those sites, in place, by recompiling the affected functions with the CUDA
spellings replaced by their CPU equivalents and swapping the new code into the existing
function objects (so every alias that imported the function sees the change). Nothing is
patched when CUDA is available.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import textwrap
import types

import torch

log = logging.getLogger(__name__)

# Modules whose functions contain CUDA-only call sites on the training path.
PATCHED_MODULES = tuple(
    f"megatron.core.{name}"
    for name in (
        "tensor_parallel.random", "tensor_parallel.layers", "tensor_parallel.mappings",
        "tensor_parallel.data", "tensor_parallel.utils",
        "pipeline_parallel.schedules", "pipeline_parallel.p2p_communication",
        "pipeline_parallel.utils",
        "distributed.param_and_grad_buffer", "distributed.distributed_data_parallel",
        "distributed.finalize_model_grads",
        "optimizer.optimizer", "optimizer.distrib_optimizer", "optimizer.clip_grads",
        "optimizer.grad_scaler",
        "models.gpt.gpt_model", "models.common.language_module.language_module",
        "models.common.embeddings.rotary_pos_embedding", "models.common.embeddings.rope_utils",
        "transformer.attention", "transformer.dot_product_attention", "transformer.module",
        "transformer.transformer_layer", "transformer.utils", "fusions.fused_softmax", "utils",
        "dist_checkpointing.exchange_utils", "dist_checkpointing.tensor_aware_state_dict",
        "dist_checkpointing.strategies.async_utils", "dist_checkpointing.strategies.torch",
        "dist_checkpointing.strategies.filesystem_async",
        "dist_checkpointing.strategies.state_dict_saver",
        "dist_checkpointing.strategies.fully_parallel",
    )
)

# (pattern, replacement), applied in order to the source of every function that matches one.
CUDA_TO_CPU = (
    (r"\.cuda\((?:[^()]|\([^()]*\))*\)", ".cpu()"),
    (r"torch\.device\(\s*[\"']cuda[\"']\s*(?:,[^()]*(?:\([^()]*\))?)?\)", 'torch.device("cpu")'),
    (r"device\s*=\s*([\"'])cuda\1", 'device="cpu"'),
    (r"torch\.cuda\.current_device\(\)", '"cpu"'),
    (r"torch\.cuda\.synchronize\(\)", "None"),
    (r"([\"'])torch\.cuda\.(\w+Tensor)\1", r"\1torch.\2\1"),
    (r"torch\.cuda\.(get_rng_state|set_rng_state|manual_seed)\(", r"torch.\1("),
)
_CUDA_SITES = [re.compile(pattern) for pattern, _ in CUDA_TO_CPU]


def _has_cuda_site(text: str) -> bool:
    # one regex per pattern: joined into one alternation, their backreferences would shift
    return any(pattern.search(text) for pattern in _CUDA_SITES)


def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    """DistributedOptimizer's copy of loaded state into torch Adam, without apex/TE. The original
    copies every key of the destination state, and torch Adam's has a 'step' that the loaded
    tensors lack (fully_reshardable: KeyError) or hold stale (dp_reshardable: 0). Copy all but
    the step; its count lives in the param groups (restored by the checkpoint loader)."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    for key, tensor in destination.items():
        if key != "step":
            tensor.copy_(tensors[key])


# megatron functions whose whole body is replaced: they drive CUDA generators directly, or (the
# optimizer one) take a path only apex/TE-less installs take, which is broken in megatron-core.
REPLACED_FUNCTIONS = {
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": _get_cpu_rng_state,
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": _set_cpu_rng_state,
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
    "_set_main_param_and_optimizer_states": _set_main_param_and_optimizer_states,
}

_active = False
patched_functions: list[str] = []


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def activate() -> bool:
    """Redirect megatron-core's CUDA-only call sites to CPU. Idempotent; no-op with CUDA."""
    global _active
    if _active or not cuda_absent():
        return _active
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # module moved in another megatron-core release
            log.debug("cpu runtime: %s not found", name)
            continue
        patched_functions.extend(_rewrite_module(module))
    for dotted, replacement in REPLACED_FUNCTIONS.items():
        target = _import_attribute(dotted)
        if target is not None:
            target.__code__ = replacement.__code__
            patched_functions.append(dotted)
    _active = True
    log.info("cpu runtime: redirected %d megatron-core functions to CPU", len(patched_functions))
    return True


def _import_attribute(dotted: str):
    """A module-level function or a class's method named by its dotted path; None if absent."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def _rewrite_module(module: types.ModuleType) -> list[str]:
    source = inspect.getsource(module)
    if not _has_cuda_site(source):
        return []
    lines = source.splitlines(keepends=True)
    rewritten = []
    for qualname, node in _function_defs(ast.parse(source)):
        segment = "".join(lines[node.lineno - 1:node.end_lineno])
        if not _has_cuda_site(segment):
            continue
        function = _resolve(module, qualname)
        if function is None:
            continue
        function.__code__ = _recompile(segment, node, function, module.__file__)
        rewritten.append(f"{module.__name__}.{qualname}")
    return rewritten


def _function_defs(tree: ast.Module):
    """Yield (qualname, FunctionDef) for module- and class-level defs."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def _resolve(module, qualname):
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if not isinstance(obj, type) else obj.__dict__.get(part)
        if obj is None:
            return None
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return None
    obj = inspect.unwrap(obj)
    return obj if isinstance(obj, types.FunctionType) else None


def _recompile(segment: str, node, function, filename: str) -> types.CodeType:
    new_source = textwrap.dedent(segment)
    for pattern, replacement in CUDA_TO_CPU:
        new_source = re.sub(pattern, replacement, new_source)
    fn_tree = ast.parse(new_source)
    fn_def = fn_tree.body[0]
    fn_def.decorator_list = []  # the live function object is already the undecorated one
    ast.increment_lineno(fn_tree, node.lineno - 1)
    if "__class__" in function.__code__.co_freevars:
        # zero-argument super() needs the __class__ cell: compile inside a class body
        shim = ast.ClassDef(name="_Shim", bases=[], keywords=[], body=[fn_def], decorator_list=[])
        if hasattr(ast.ClassDef, "type_params"):
            shim.type_params = []
        fn_tree.body = [shim]
    ast.fix_missing_locations(fn_tree)
    code = compile(fn_tree, filename, "exec")
    new_code = _find_code(code, function.__code__.co_name)
    if new_code.co_freevars != function.__code__.co_freevars:
        raise RuntimeError(f"cpu runtime: cannot rewrite {function.__qualname__} (closure differs)")
    return new_code


def _find_code(code: types.CodeType, name: str) -> types.CodeType:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name:
                return const
            found = _find_code(const, name)
            if found is not None:
                return found
    return None


def refuse_sequence_parallel(sequence_parallel: bool) -> None:
    if sequence_parallel and cuda_absent():
        raise ValueError(
            "sequence_parallel=true needs TransformerEngine or apex norms, which exist only with "
            "CUDA; on CPU set parallel.sequence_parallel=false"
        )
