"""No code from the Hub runs unless the user asks: bitsandbytes' CPU kernel and transformers' hub kernels."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import importlib.util, functionalnetworkssft\n"
         # Libraries ask whether bitsandbytes is installed long before they import it: the hook must outlive that.
         "assert importlib.util.find_spec('bitsandbytes') is not None\n"
         "import peft, torch, bitsandbytes.functional as F, sys\n"
         "torch.manual_seed(0)\n"
         "w = torch.randn(64, 64)\n"
         "packed, state = F.quantize_4bit(w, blocksize=64, quant_type='nf4')\n"
         # NF4 keeps 16 levels per block of 64, scaled by the block's largest |value|: within a fifth of it.
         "err = ((F.dequantize_4bit(packed, state) - w).abs().max() / w.abs().max()).item()\n"
         "print('bnb works' if err < 0.2 else f'bnb wrong: {err}')\n")


def run(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", **extra_env)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


def bitsandbytes_looks_up_a_cpu_kernel() -> bool:
    """bitsandbytes fetches its CPU kernel only on processors with AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_bitsandbytes_loads_without_a_hub_kernel_and_still_quantizes():
    quiet = run({})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "bnb works" in quiet.stdout
    assert "kernels-community" not in quiet.stderr and "trust" not in quiet.stderr, quiet.stderr[-2000:]


def test_use_hub_kernels_yes_gives_the_libraries_their_own_way_back():
    opted_in = run({"USE_HUB_KERNELS": "YES"})
    assert opted_in.returncode == 0 and "bnb works" in opted_in.stdout, opted_in.stderr[-2000:]
    assert ("kernels-community/quantization-bitsandbytes" in opted_in.stderr) == bitsandbytes_looks_up_a_cpu_kernel()
