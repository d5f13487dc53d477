"""The AdaMMS authors' criterion (count of inputs whose answer differs from either neighbour's), by hand."""

from __future__ import annotations

import pytest

from souplm.errors import SoupError
from souplm.search import consistency as C

# Five alphas, four inputs. Answers per alpha, input by input.
R = {
    0.0: ["a", "b", "c", "d"],
    0.1: ["a", "b", "c", "x"],
    0.2: ["A", "b", "c", "x"],  # "A" equals "a": the comparison ignores case
    0.3: ["a", "b", "y", "x"],
    0.4: ["q", "r", "y", "z"],
}


def test_changed_count_curve_by_hand() -> None:
    # 0.1: input 3 differs from 0.0 ("d" vs "x") -> 1. 0.2: all equal to both neighbours except input 2
    # vs 0.3 ("c" vs "y") -> 1. 0.3: input 2 differs from 0.2; inputs 0, 1 and 3 differ from 0.4 -> 4.
    assert C.changed_count_curve(R) == {0.1: 1.0, 0.2: 1.0, 0.3: 4.0}
    assert C.same_answer("Blue", "blue") and not C.same_answer("blue ", "blue")  # case only, as the authors


def test_every_minimum_is_reported_and_the_chosen_one_is_among_them() -> None:
    curve = C.changed_count_curve(R)
    assert C.minima(curve) == [0.1, 0.2]
    assert C.choose_alpha(curve) in (0.1, 0.2)
    # Smoothing over one neighbour each side (truncated at the ends): 0.1 -> (1+1)/2, 0.2 -> 2, 0.3 -> 2.5.
    assert C.smooth(curve, 1) == pytest.approx({0.1: 1.0, 0.2: 2.0, 0.3: 2.5})
    assert C.minima(curve, 1) == [0.1]


def test_the_mean_criterion_differs_from_the_count() -> None:
    # The mean criterion averages the two neighbours' disagreement rates: 0.1 -> (1/4 + 0) / 2 = 0.125.
    mean = C.difference_curve(R, ["exact"])["exact"]
    assert mean[0.1] == pytest.approx(0.125) and mean[0.3] == pytest.approx((1 / 4 + 3 / 4) / 2)


def test_chooser_names_the_curve_and_refuses_what_the_authors_never_defined() -> None:
    assert C.chooser("adamms", "exact") == C.CHANGED
    assert C.chooser("adamms", "embedding") == "embedding"
    assert C.chooser("mean", "token_f1") == "token_f1"
    with pytest.raises(SoupError, match="metric exact or embedding"):
        C.chooser("adamms", "token_f1")
    with pytest.raises(SoupError, match="unknown criterion"):
        C.chooser("median", "exact")
    with pytest.raises(SoupError, match="at least 3 alphas"):
        C.changed_count_curve({0.0: ["a"], 1.0: ["b"]})
    with pytest.raises(SoupError, match="differ in length"):
        C.changed_count_curve({0.0: ["a"], 0.5: ["b", "c"], 1.0: ["b"]})


def test_search_cli_defaults_to_the_authors_criterion_and_refuses_a_metric_it_has_no_form_for(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from souplm.cli import build_parser, main

    args = build_parser().parse_args(["search", "--target", "t", "--source", "s", "--inputs", "u.jsonl", "-o", "o"])
    assert (args.criterion, args.metric, args.sample) == ("adamms", "exact", 100)
    code = main(["search", "--target", str(tmp_path / "t"), "--source", str(tmp_path / "s"), "--inputs",
                 str(tmp_path / "u.jsonl"), "-o", str(tmp_path / "o"), "--metric", "token_f1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("souplm: error: criterion adamms") and "--criterion mean" not in err
    assert not (tmp_path / "o").exists()
