"""``train.label_logits`` runs the vocabulary head only at the positions it reads, and gives what the full-width
logits give there, for every kind of method (a wrapped layer, a prefix in the cache, a soft prompt in front)."""
import pytest
import torch

from peft_lab import data, models, train
from peft_lab.methods import freeze, lora, prefix, prompt

from conftest import make_tiny_task

MAKERS = {
    "base": lambda m, tok: m,
    "full": lambda m, tok: freeze.apply(models.fresh_copy(m), "full", verbose=False),
    "lora": lambda m, tok: lora.apply(models.frozen_copy(m), rank=2, targets=["q_proj", "v_proj"]),
    "prefix": lambda m, tok: prefix.apply(models.frozen_copy(m), num_virtual_tokens=3),
    "prompt": lambda m, tok: prompt.apply(models.frozen_copy(m), num_virtual_tokens=4),
}


@pytest.mark.parametrize("method", list(MAKERS))
def test_the_label_logits_equal_the_full_logits_at_each_rows_last_token(method, tiny_llama, tokenizer):
    torch.manual_seed(0)
    tuned = MAKERS[method](tiny_llama, tokenizer)
    task = make_tiny_task()
    examples = [("the film was great", "positive"), ("the film was bad i hated this movie", "negative"),
                ("great", "positive"), ("i loved this movie the film was great", "positive"),
                ("bad", "negative"), ("i hated this movie", "negative")]
    batch = data.encode(examples, task, tokenizer)
    assert len(set(batch["last"].tolist())) > 1, "the batch should have rows of different lengths"
    with torch.no_grad():
        full = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = full[torch.arange(full.shape[0]), batch["last"]]
        seen = []
        head = next(m for n, m in tuned.named_modules() if n.endswith("lm_head"))  # wrapped or not
        handle = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
        got = train.label_logits(tuned, batch)
        handle.remove()
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # the head saw one position per distinct last token, not every token of every row
    assert seen == [torch.Size([6, len(set(batch["last"].tolist())), tiny_llama.config.hidden_size])]
