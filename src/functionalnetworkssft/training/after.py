"""The end of a run: the merge into merged_model/ and the GGUF export, each of which may fail without taking the
trained model with it."""

from __future__ import annotations

import sys
from pathlib import Path

from functionalnetworkssft import modeling
from functionalnetworkssft.errors import FnsftError, first_line
from functionalnetworkssft.training.config import TrainConfig

GGUF_FILE = "model.gguf"


def export_model(cfg: TrainConfig, model_dir: Path, outfile: Path) -> bool:
    """Export to GGUF; a failure leaves training successful, says how to retry, and stops only an upload that
    needs the file."""
    from functionalnetworkssft.export import export_gguf

    retry = f"fnsft export-gguf {model_dir} --outfile {outfile} --outtype {cfg.gguf_outtype}"
    if not (model_dir / "config.json").is_file():
        reason = "there is no merged model to export (the merge failed)"
    else:
        try:
            print(export_gguf(model_dir, outfile, outtype=cfg.gguf_outtype)["summary"])
            return True
        except Exception as exc:  # training succeeded: an export problem must not take the model with it
            reason = first_line(exc)
    print(f"GGUF export failed: {reason}\nThe model is saved in {model_dir}; retry with: {retry}", file=sys.stderr)
    if cfg.upload_gguf:
        raise FnsftError(f"--upload_gguf: nothing to upload because the GGUF export failed; retry with: {retry}")
    return False


def merge_model(cfg: TrainConfig, source: modeling.ModelSource, adapter_dir: Path, merged_dir: Path) -> None:
    """Merge with the project's engine; a failure leaves the adapter saved and says how to retry."""
    from functionalnetworkssft.merge import merge_adapter

    try:
        report = merge_adapter(adapter_dir, merged_dir, base_model=source.path,
                               trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # training succeeded: no merge problem may take the adapter with it
        print(f"Merge failed: {first_line(exc)}\nThe adapter is saved in {adapter_dir}; retry with: fnsft merge "
              f"--adapter_path {adapter_dir} --output_dir {merged_dir}", file=sys.stderr)
        if cfg.upload_merged_model:
            raise FnsftError("--upload_merged_model: nothing to upload because the merge failed; the adapter is "
                             f"saved in {adapter_dir}.") from exc
        return
    print(report.summary())
