"""Run a GGUF through llama.cpp (llama-cpp-python) in a child process.

A llama.cpp build can die on this machine's CPU (an instruction the build assumed and the CPU or VM refuses) or
abort inside the library; in a child process that is reported as a failed check instead of taking the export, and
the training run around it, down with it.

    python -m functionalnetworkssft.export.llama_cpp FILE.gguf REQUEST.json RESULT.npz
    python -m functionalnetworkssft.export.llama_cpp --quantize IN.gguf OUT.gguf FTYPE

The second form is llama.cpp's quantizer (what llama-quantize runs), for the k-quant types, which the gguf package
cannot write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


# The child's exit status when llama.cpp loaded and refused the file (wrong tensors, missing metadata).
REFUSED = 3


class Refused(str):
    """llama.cpp read the file and would not load it: the file is wrong, whatever the build."""


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run(gguf_path: Path, probes: list[list[int]], greedy_tokens: int, texts: list[str], timeout: float = 600.0
        ) -> tuple[list[np.ndarray], list[list[int]], list[list[int]]] | str:
    """Each probe's logits and greedy continuation from llama.cpp, and its tokenization of `texts` (special tokens
    parsed, BOS as the file says), or a sentence saying why there are none (a Refused one when llama.cpp would not
    load the file)."""
    with tempfile.TemporaryDirectory(prefix="fnsft-llama-cpp-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        request.write_text(json.dumps({"probes": probes, "greedy_tokens": greedy_tokens, "texts": texts}))
        failure = _child([str(gguf_path), str(request), str(result)], result, timeout, "llama.cpp")
        if failure:
            return Refused(failure) if failure.startswith(f"llama.cpp failed (exit {REFUSED})") else failure
        with np.load(result) as saved:
            count = len(probes)
            return ([saved[f"logits{i}"] for i in range(count)],
                    [saved[f"greedy{i}"].astype(int).tolist() for i in range(count)],
                    [saved[f"tokens{i}"].astype(int).tolist() for i in range(len(texts))])


def quantize(infile: Path, outfile: Path, ftype: int, timeout: float = 24 * 3600.0) -> str | None:
    """Quantize infile (f16) into outfile with llama.cpp's own rules for `ftype` (e.g. Q4_K_M keeps the attention
    value and feed-forward down projections of some layers at Q6_K); None, or a sentence saying why it failed."""
    return _child(["--quantize", str(infile), str(outfile), str(ftype)], outfile, timeout, "llama.cpp's quantizer")


def _child(arguments: list[str], output: Path, timeout: float, what: str) -> str | None:
    """Run this module in a child process; None when it wrote `output`, else a sentence saying why not."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, *arguments], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{what} did not finish within {timeout:.0f} s"
    if done.returncode == 0 and output.is_file():
        return None
    if done.returncode < 0:
        import signal

        return (f"{what} crashed ({signal.Signals(-done.returncode).name}); the llama-cpp-python build may not suit "
                "this CPU (rebuild it with CMAKE_ARGS=-DGGML_NATIVE=OFF)")
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{what} failed (exit {done.returncode}): {last[:200]}"


def _quantize(infile: str, outfile: str, ftype: str) -> None:
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(infile.encode(), outfile.encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code}")


def _main(gguf_path: str, request_path: str, result_path: str) -> None:
    from llama_cpp import Llama

    request: dict[str, Any] = json.loads(Path(request_path).read_text())
    probes, greedy_tokens = request["probes"], request["greedy_tokens"]
    try:
        model = Llama(model_path=gguf_path, n_ctx=max(64, max(len(p) for p in probes) + greedy_tokens + 8),
                      logits_all=True, verbose=False, seed=0)
    except ValueError as exc:  # llama.cpp read the file and refused it: a verdict on the file, not on the build
        print(f"llama.cpp refused the file: {exc}", file=sys.stderr)
        raise SystemExit(REFUSED) from None
    arrays = {}
    for index, probe in enumerate(probes):
        model.reset()
        model.eval(probe)
        # A copy: `scores` is llama.cpp's buffer, which the next probe overwrites.
        arrays[f"logits{index}"] = np.array(model.scores[: len(probe)], dtype=np.float32, copy=True)
        continuation = []
        for _ in range(greedy_tokens):
            token = int(np.asarray(model.scores[model.n_tokens - 1]).argmax())
            continuation.append(token)
            model.eval([token])
        arrays[f"greedy{index}"] = np.asarray(continuation, dtype=np.int64)
    add_bos = bool(model.metadata.get("tokenizer.ggml.add_bos_token") == "true")
    for index, text in enumerate(request["texts"]):
        arrays[f"tokens{index}"] = np.asarray(model.tokenize(text.encode(), add_bos=add_bos, special=True),
                                              dtype=np.int64)
    staging = Path(result_path).with_suffix(".partial.npz")
    np.savez(staging, **arrays)
    staging.replace(result_path)


if __name__ == "__main__":
    if sys.argv[1] == "--quantize":
        _quantize(*sys.argv[2:5])
    else:
        _main(*sys.argv[1:4])
