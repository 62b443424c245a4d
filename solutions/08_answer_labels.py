"""Notebook 08, exercise (b): the labels of instruction tuning, the loss on the answer only.

Checked by ``exercises.check_answer_labels``; the package's own version is ``chat.answer_labels`` in
``peft_lab/chat.py``.
"""


def answer_labels_mine(ids, prompt_len, end_id):
    labels = [-100] * len(ids)               # -100: the cross-entropy skips it
    for i in range(prompt_len, len(ids)):    # the prompt stays -100: the model is not taught to write the question
        labels[i] = ids[i]                   # each token is its own label; the loss does the shifting
        if ids[i] == end_id:                 # keep the end-of-turn token, so the model learns to stop, and no more
            break
    return labels
