"""Data tools: preprocess (JSONL/Parquet -> megatron-core .bin/.idx, incl. MPI sharding), the AI-discourse filter, filter-eval, inspect."""
