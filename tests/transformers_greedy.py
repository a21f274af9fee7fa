"""transformers' own greedy decoding of one unpadded prompt: the reference the fast engine's decode is held to."""
import torch


@torch.inference_mode()
def transformers_greedy(model, tokenizer, prompt, steps):
    """transformers' own forward (its default experts implementation), one sequence, no padding. Returns the greedy
    tokens, each step's top-1 minus top-2 logit, each step's largest |logit| and the first step's logits (float32)."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    cache, out, margins, scales, first_logits = DynamicCache(), [], [], [], None
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
        first_logits = logits if first_logits is None else first_logits
        top2 = logits.topk(2, dim=-1).values[0]
        margins.append(float(top2[0] - top2[1]))
        scales.append(float(logits.abs().max()))
        ids = logits.argmax(-1, keepdim=True)
        out.append(int(ids))
    return out, margins, scales, first_logits
