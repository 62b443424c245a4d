"""The chat panel of notebook 08 (``widgets.chat_panel``): driven as a learner would, in a kernel without a browser.
Run under Colab's ipywidgets 7.7.1 too (``make widget-test-colab``)."""
import pytest

from peft_lab import widgets


def test_the_chat_panel_asks_every_model(chat_tokenizer, chat_llama):
    panel = widgets.chat_panel({"base": chat_llama, "again": chat_llama}, chat_tokenizer, message="the film was great")
    panel.max_new_tokens = 3
    replies = panel.ask()
    assert list(replies) == ["base", "again"] and replies["base"] == replies["again"]
    assert "base" in panel.table.value and not panel.button.disabled
    panel.message.value = " "
    assert panel.ask() == {} and "Type a message" in panel.status.value
    with pytest.raises(ValueError, match="at least one model"):
        widgets.chat_panel({}, chat_tokenizer)


