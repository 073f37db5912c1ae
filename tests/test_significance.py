"""experiments/significance.py against values known in closed form: Student's t with one degree of
freedom is the Cauchy distribution (P(|T| >= 1) = 1/2), with very many it is the normal; Fisher's
tea-tasting table (3 of 4 right against 1 of 4) has the two-sided p 34/70."""

import math

from conftest import run
from experiments import significance


def test_t_tail_matches_cauchy_and_normal():
    assert abs(significance.student_t_two_sided(1.0, 1) - 0.5) < 1e-9
    assert abs(significance.student_t_two_sided(3.0, 1) - (1 - 2 * math.atan(3.0) / math.pi)) < 1e-9
    assert abs(significance.student_t_two_sided(2.0, 1e7) - math.erfc(2 / math.sqrt(2))) < 1e-6


def test_fisher_matches_the_tea_tasting_table():
    assert abs(significance.fisher(3, 4, 1, 4) - 34 / 70) < 1e-12
    assert significance.fisher(0, 10, 0, 10) == 1.0


def test_welch_by_hand_and_the_command_line():
    t, df, p = significance.welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    # means 2 and 4, variances of the mean 1/3 and 4/3: t = -2 / sqrt(5/3); df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2)
    assert abs(t + 2 / math.sqrt(5 / 3)) < 1e-12 and abs(df - (25 / 9) / (17 / 18)) < 1e-12
    assert abs(p - significance.student_t_two_sided(abs(t), df)) < 1e-12
    out = run("experiments.significance", "--a=0.99,0.995,0.9975", "--b=1.0,0.995,1.0", "--n=400", module=True).stdout
    assert "7 wrong of 1200" in out and "2 wrong of 1200" in out and "p = 0.21" in out and "p = 0.18" in out
    bad = run("experiments.significance", "--a=0.99", "--b=1.0,0.995", "--n=400", check=False, module=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
