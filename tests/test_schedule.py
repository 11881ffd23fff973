import numpy as np
import pytest

from attnmod.schedule import Schedule, as_schedule


def test_default_is_no_change():
    s = Schedule()
    assert s.is_neutral
    assert np.array_equal(s.compile(7), np.ones(7))


def test_constant_rate_matches_the_reference_formula():
    s = Schedule(start=-5, rate=0.2)
    assert np.allclose(s.compile(30), [-5 + 0.2 * i for i in range(30)])
    assert not s.is_neutral


def test_variable_rate_follows_the_papers_recurrence():
    s = Schedule(start=2.0, rate=-0.1, accel=0.02)
    m, expected = 2.0, []
    for i in range(40):
        expected.append(m)
        m += -0.1 + 0.02 * i  # rate_i = rate + accel * i; m_{i+1} = m_i + rate_i
    assert np.allclose(s.compile(40), expected)
    assert np.allclose(Schedule(3, 0.5, 0).compile(10), Schedule(3, 0.5).compile(10))


def test_list_schedule_and_its_length_check():
    s = Schedule(values=(1, 0.5, 0.25))
    assert np.array_equal(s.compile(3), [1, 0.5, 0.25])
    with pytest.raises(ValueError, match="3 multipliers but this loop makes 4"):
        s.compile(4)
    assert Schedule(values=(1, 1)).is_neutral


@pytest.mark.parametrize("text", ["-5", "-5:0.2", "1:0.5:-0.01", "[1,0.5,0.25]"])
def test_text_round_trip(text):
    s = Schedule.parse(text)
    assert Schedule.parse(s.to_text()) == s
    assert Schedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad", ["", "a", "1:2:3:4", "[1,2", "1::2", "[nan]"])
def test_malformed_text_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        Schedule.parse(bad)


def test_validation():
    with pytest.raises(ValueError, match="finite"):
        Schedule(start=float("inf"))
    with pytest.raises(ValueError, match="not both"):
        Schedule(start=2, values=(1, 2))
    with pytest.raises(ValueError):
        Schedule(values=())
    assert as_schedule(-3) == Schedule(-3)
    assert as_schedule((1, 0.5)) == Schedule(1, 0.5)
    assert as_schedule("2:0.1") == Schedule(2, 0.1)
