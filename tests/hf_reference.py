"""Hugging Face transformers as the reference: the model, and the check that greedy tokens and logprobs match."""
from __future__ import annotations

import pytest
import torch


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: EOS neither stops nor gets masked
    return model


def assert_greedy_matches_transformers(model_dir, prompts, completions, new_tokens: int, atol: float,
                                       logprob_steps: int = 4) -> None:
    """Same greedy token ids as transformers' generate; top-5 logprobs of the first steps within atol."""
    model = hf_model(model_dir)
    for prompt, completion in zip(prompts, completions):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
            )
        expected = out.sequences[0, len(prompt):].tolist()
        assert completion.token_ids == expected
        for step in range(logprob_steps):
            reference = torch.log_softmax(out.logits[step][0].float(), dim=-1)
            values, ids = reference.topk(5)
            ours = completion.logprobs[step]
            assert [token for token, _ in ours.top] == ids.tolist()
            assert [value for _, value in ours.top] == pytest.approx(values.tolist(), abs=atol)
            assert ours.logprob == pytest.approx(reference[expected[step]].item(), abs=atol)
