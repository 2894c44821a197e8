"""G-OPD with TRL: GOPDTrainer is TRL's on-policy DistillationTrainer with gopd's fused loss.

The student samples at the loss's temperature, the teacher and the reference (by default a frozen copy of
the student's initial weights) score its tokens from their final hidden states, and the loss is the token
mean over the step's generated tokens. Tiny random Llamas and a character tokenizer stand in for real
checkpoints (use AutoModelForCausalLM / AutoTokenizer.from_pretrained(...) for yours).
Needs `pip install .[trl]`. Run: python examples/trl_distill.py
"""
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gopd.integrations.trl import GOPDConfig, GOPDTrainer


def char_tokenizer(chars="abcdefghijklmnopqrstuvwxyz "):
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}, "<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                        eos_token_id=1, bos_token_id=None))


def main(steps=8, lam=1.25, mode="full", out_dir=None):
    teacher = tiny(1)
    teacher.lm_head.weight.data *= 20  # a teacher with opinions: far from the near-uniform random student
    prompts = Dataset.from_dict({"prompt": ["the sum of", "hello", "a b c", "once upon"] * 2})
    args = GOPDConfig(output_dir=out_dir or tempfile.mkdtemp(), lam=lam, mode=mode, temperature=1.0,
                      per_device_train_batch_size=8, max_steps=steps, max_completion_length=8, learning_rate=1e-2,
                      logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                      gradient_checkpointing=False)
    trainer = GOPDTrainer(tiny(0), teacher, args=args, train_dataset=prompts, processing_class=char_tokenizer())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return losses[0], losses[-1]


if __name__ == "__main__":
    main()
