"""``notebook.check``: exercise answers are accepted in any reasonable form and wrong ones refused."""
import torch

from peft_lab import notebook


def verdict(capsys, answer, expected, **kw):
    notebook.check("q", answer, expected, **kw)
    return capsys.readouterr().out.strip()


def test_unanswered_is_said_so(capsys):
    assert "not answered yet" in verdict(capsys, ..., 3)


def test_a_list_counts_for_a_tuple_and_the_other_way(capsys):
    assert verdict(capsys, [4, 3, 19, 64], (4, 3, 19, 64)) == "q: correct"
    assert verdict(capsys, (4, 3, 19, 64), [4, 3, 19, 64]) == "q: correct"
    assert verdict(capsys, [4, 9, 19, 64], (4, 3, 19, 64)) == "q: not yet - try again"  # query heads, not key/value
    assert verdict(capsys, [4, 3, 19], (4, 3, 19, 64)) == "q: not yet - try again"


def test_a_token_with_or_without_its_space_marker(capsys):
    assert verdict(capsys, " negative", "Ġnegative") == "q: correct"
    assert verdict(capsys, "Ġnegative", "Ġnegative") == "q: correct"
    assert verdict(capsys, "negative", "Ġnegative") == "q: correct"
    assert verdict(capsys, " positive", "Ġnegative") == "q: not yet - try again"


def test_numbers_within_tolerance_and_tensors_by_shape_and_value(capsys):
    assert verdict(capsys, 2052.5, 2052.5000001, tol=1e-3) == "q: correct"
    assert verdict(capsys, 2000, 2052.5, tol=1e-3) == "q: not yet - try again"
    assert verdict(capsys, "2052.5", 2052.5, tol=1e-3) == "q: correct"  # a number typed as text still counts
    assert verdict(capsys, "a lot", 2052.5) == "q: not yet - try again"
    t = torch.ones(2, 3)
    assert verdict(capsys, t.clone(), t) == "q: correct"
    assert verdict(capsys, t.T, t) == "q: not yet - try again"  # a transposed answer
