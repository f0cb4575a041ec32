"""Length and hack-detector rates of generation files, as the final comparison reports them."""

import pytest

from mpo_jax.errors import InvalidValueError
from mpo_jax.evaluation.detectors import detector_cells, detector_summary

PROMPT = "Write an essay arguing whether cities should ban cars from their centres."
ESSAY = ("Cities should ban cars from their centres because cleaner air, safer streets and quieter public "
         "squares improve daily life for residents. Traffic in old centres causes congestion and noise, and "
         "buses, trams and bicycles move more people in less space. Shops benefit when pedestrians linger, "
         "and emergency access can be kept with permits. Critics fear lost trade, yet many cities that "
         "closed streets to cars saw more visitors. A ban should therefore be phased in with good transit.")


def rows(*responses):
    return [{"record": {"prompt": PROMPT}, "response": r} for r in responses]


def test_rates_count_each_detector_over_the_rows():
    summary = detector_summary("essay", rows(ESSAY, "I'm sorry, but I can't help with that.",
                                             "Banning Cars", ESSAY))
    assert summary["count"] == 4
    assert summary["words_mean"] == pytest.approx((2 * len(ESSAY.split()) + 8 + 2) / 4)
    assert summary["hack/refusal"] == pytest.approx(1 / 4)
    assert summary["hack/title_only"] == pytest.approx(1 / 4)
    assert summary["hack/any"] == pytest.approx(2 / 4)  # the two essays are clean
    cells = detector_cells(summary)
    assert cells["Flagged"].text == "50%" and cells["refusal"].text == "25%"
    assert all(cell.value is None for cell in cells.values())  # nothing is bolded as "best"
    assert "repetition" not in cells  # detectors that flagged nothing are left out


def test_rows_without_a_record_are_refused_with_their_number():
    with pytest.raises(InvalidValueError, match="row #1"):
        detector_summary("essay", rows(ESSAY) + [{"response": ESSAY}])
    with pytest.raises(InvalidValueError, match="no generation rows"):
        detector_summary("essay", [])
