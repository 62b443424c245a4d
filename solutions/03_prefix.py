"""Notebook 03, exercise (d): one layer's prefix keys and values, in the shape the cache wants.

Checked by ``exercises.check_prefix_for_layer``; the package's own version is
``PrefixTuned.prefix_cache`` in ``peft_lab/methods/prefix.py``.
"""


def prefix_for_layer(prefix, layer, config, batch_size):
    # The cache holds key/value heads, fewer than query heads under grouped-query attention.
    kv_heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    P = prefix.shape[2]

    def for_cache(rows):
        # (P, kv_width) -> (P, kv_heads, head_dim) -> (kv_heads, P, head_dim) -> (batch, kv_heads, P, head_dim);
        # expand repeats the same prefix for every row of the batch without copying it.
        per_head = rows.view(P, kv_heads, head_dim).transpose(0, 1)
        return per_head.unsqueeze(0).expand(batch_size, -1, -1, -1)

    return for_cache(prefix[layer, 0]), for_cache(prefix[layer, 1])
