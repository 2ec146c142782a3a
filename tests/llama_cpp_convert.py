"""Run llama.cpp's own converter (convert_hf_to_gguf.py, unpacked by `make setup`) on a model folder, telling it the
BPE pre-tokenizer's name: it recognises one by hashing how the tokenizer splits a test text, which works only for
published vocabularies, not the tests' tiny ones ("-": a SentencePiece tokenizer, nothing to tell).

    python tests/llama_cpp_convert.py CONVERTER_DIR PRE_NAME MODEL_DIR --outfile F.gguf --outtype f32

FNSFT_OLD_HPARAMS (JSON) adds hyperparameters under the names the converter reads where transformers 5's config
spells them otherwise (GPT-NeoX's rotary_pct, GPT-2's n_ctx): the model is the same.
"""

import json
import os
import runpy
import sys

root, pre = sys.argv[1], sys.argv[2]
script = os.path.join(root, "convert_hf_to_gguf.py")
sys.argv = [script] + sys.argv[3:]
# Its own gguf-py: the converter is written against it, not against the gguf release fnsft uses.
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
import conversion.base  # noqa: E402

if pre != "-":
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
extra = json.loads(os.environ.get("FNSFT_OLD_HPARAMS", "{}"))
if extra:
    load = conversion.base.ModelBase.load_hparams
    conversion.base.ModelBase.load_hparams = staticmethod(lambda *args, **kwargs: {**load(*args, **kwargs), **extra})
runpy.run_path(script, run_name="__main__")
