"""Exports for the tools users take the results to.

- Preference pairs as a `datasets` parquet file with the images embedded (not paths), in TRL's
  conversational format: `datasets.load_dataset("parquet", data_files=...)` or `push_to_hub` as is.
- The merged model needs no export: `round_N/merge/` is a save_pretrained folder of the policy's own
  class (e.g. `LlavaForConditionalGeneration`; safetensors + processor) that transformers,
  lmms-eval and vLLM load.
"""

from __future__ import annotations

from pathlib import Path

PAIRS_PARQUET = "pairs.parquet"


def export_pairs_parquet(records: list[dict], out_file: str | Path) -> Path:
    """Write TRL-format pair records (image paths in `images`) to parquet with the image bytes inside."""
    import datasets
    from datasets.table import embed_table_storage

    out_file = Path(out_file)
    ds = datasets.Dataset.from_list(records)
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    ds.to_parquet(str(tmp))
    tmp.replace(out_file)
    return out_file
