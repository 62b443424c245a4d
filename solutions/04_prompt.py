"""Notebook 04, exercise (d): put the soft prompt in front of the input, with its mask and labels.

Checked by ``exercises.check_join_prompt``; the package's own version is ``PromptTuned.forward``
(with ``embed_with_prompt`` and ``extend_mask``) in ``peft_lab/methods/prompt.py``.
"""
import torch


def join_prompt(prompt, embeds, attention_mask, labels):
    batch, P = embeds.shape[0], prompt.shape[0]
    # The same (P, d) prompt in front of every row of the batch.
    inputs_embeds = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
    # P ones in front: every real token may look at the whole prompt (padding stays masked).
    mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
    # P values of -100 in front: the loss ignores them, nothing is predicted at the prompt.
    labels = torch.cat([labels.new_full((batch, P), -100), labels], dim=1)
    return inputs_embeds, mask, labels
