"""Notebook 02, exercise (b): LoRA's forward pass and its merge, for the package's ``LoRALinear``.

Checked by ``exercises.check_lora_forward`` and ``exercises.check_lora_merge``; the package's own
versions are ``LoRALinear.forward`` and ``LoRALinear.merge`` in ``peft_lab/methods/lora.py``.
"""


def lora_forward(layer, x):
    # y = W x + (alpha / r) B A x: the frozen layer, plus the low-rank update scaled once.
    # lora_A and lora_B are nn.Linear layers, so calling them applies x @ A.T, then @ B.T.
    return layer.base(x) + layer.scaling * layer.lora_B(layer.lora_A(x))


def lora_merge(layer):
    # B (out x r) @ A (r x in) is out x in, the layout nn.Linear stores its weight in.
    update = layer.lora_B.weight @ layer.lora_A.weight
    return layer.base.weight + layer.scaling * update
