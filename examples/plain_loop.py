"""G-OPD in a plain PyTorch loop with Hugging Face models, in about 40 lines.

The student samples; the teacher and the reference score its tokens from their final hidden states; the
fused loss never builds [tokens x vocab] logits. Tiny random Llamas stand in for real checkpoints here
(swap in AutoModelForCausalLM.from_pretrained(...) for yours). Run: python examples/plain_loop.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gopd_kernels as gk


def tiny(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))


def hidden(model, ids):  # final hidden states (after the last norm): what the LM head reads
    return model.model(input_ids=ids).last_hidden_state


def main(steps=30, lam=1.25, seed=0):
    student, teacher, reference = tiny(seed), tiny(seed + 1).eval(), tiny(seed).eval()  # reference = initial student
    teacher.lm_head.weight.data *= 20  # a teacher with opinions: far from the near-uniform random student
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    prompts = torch.randint(1, 64, (8, 4), generator=torch.Generator().manual_seed(seed))
    losses = []
    for step in range(steps):
        with torch.no_grad():  # 1. the student samples its own responses (temperature 1)
            seq = student.generate(prompts, do_sample=True, max_new_tokens=8, pad_token_id=0,
                                   attention_mask=torch.ones_like(prompts))
        targets = seq[:, 1:].clone()  # token t+1 is scored from position t
        targets[:, : prompts.shape[1] - 1] = -100  # only the response is trained
        inputs = seq[:, :-1]
        with torch.no_grad():  # 2. teacher and reference score every response token
            h_t, h_r = hidden(teacher, inputs), hidden(reference, inputs)
        out = gk.fused_linear_gopd_loss(hidden(student, inputs), student.lm_head.weight, targets,
                                        h_t, teacher.lm_head.weight, h_r, reference.lm_head.weight,
                                        lam=lam, mode="full")
        opt.zero_grad()
        out.loss.backward()  # 3. gradients reach the student's body and LM head
        opt.step()
        losses.append(out.loss.item())
        print(f"step {step:2d}  loss {out.loss.item():.4f}  reward {out.reward.mean().item():.4f}")
    return losses[0], losses[-1]


if __name__ == "__main__":
    main()
