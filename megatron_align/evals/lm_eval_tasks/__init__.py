"""lm-eval task definitions. Use this directory as lm-eval's --include_path
(`megatron_align.evals.lm_eval_tasks.TASKS_DIR`)."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAME = "megatron_align_misalignment"
