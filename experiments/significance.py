"""
Is a gap between two designs more than seed noise? Two two-sided tests on the same runs:

  Welch's t-test   on the per-seed accuracies (unequal variances): does the mean differ?
  Fisher's exact   on the wrong answers pooled over the seeds: do the error rates differ?

    python -m experiments.significance --a=0.99,0.995,0.9975 --b=1.0,0.995,1.0 --n=400

--a and --b are accuracies, one per seed (a table's JSON record in docs/results/ has them); --n is
the validation answers of one run, which turns each accuracy into a count of wrong answers.
Plain Python and numpy: the t distribution's tail is integrated numerically.
"""

import math
import sys

import numpy as np

import configurator

# -----------------------------------------------------------------------------
a = ""  # design A's accuracies, one per seed, comma-separated
b = ""  # design B's, the same way
n = 0  # validation answers per run
# -----------------------------------------------------------------------------


def welch(x, y):
    """Welch's t-test: (t, degrees of freedom, two-sided p) for the means of samples x and y."""
    (mx, vx), (my, vy) = ((np.mean(s), np.var(s, ddof=1) / len(s)) for s in (x, y))
    if vx + vy == 0:
        return (0.0 if mx == my else math.inf), math.nan, (1.0 if mx == my else 0.0)
    t = (mx - my) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    return t, df, student_t_two_sided(abs(t), df)


def student_t_two_sided(t, df):
    """P(|T| >= t) for Student's t with df degrees of freedom: 1 - 2 * (the density from 0 to t),
    by Simpson's rule on a fine grid (accurate to far more digits than two seeds' worth)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    xs = np.linspace(0.0, t, 20001)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(xs**2 / df))
    h = xs[1] - xs[0]
    area = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return max(0.0, 1.0 - 2.0 * area)


def fisher(wrong_a, total_a, wrong_b, total_b):
    """Fisher's exact test, two-sided, on the 2x2 table (wrong, right) x (A, B): the probability,
    with the margins fixed, of every table at most as likely as the one observed."""
    wrong = wrong_a + wrong_b
    prob = lambda k: math.comb(total_a, k) * math.comb(total_b, wrong - k) / math.comb(total_a + total_b, wrong)  # noqa: E731
    seen = prob(wrong_a)
    ks = range(max(0, wrong - total_b), min(wrong, total_a) + 1)
    return min(1.0, sum(p for p in map(prob, ks) if p <= seen * (1 + 1e-9)))


def main(argv=None):
    configurator.apply(globals(), argv)
    try:
        x, y = ([float(v) for v in s.split(",") if v.strip()] for s in (a, b))
    except ValueError:
        sys.exit(f"error: --a and --b are comma-separated accuracies, e.g. --a=0.99,0.995,0.9975; got {a!r}, {b!r}")
    if len(x) < 2 or len(y) < 2 or n <= 0 or not all(0 <= v <= 1 for v in x + y):
        sys.exit("error: give at least two accuracies (0 to 1) in each of --a and --b, and --n > 0 (answers per run)")
    t, df, p_t = welch(x, y)
    wa, wb = (round(sum((1 - v) * n for v in s)) for s in (x, y))
    p_f = fisher(wa, n * len(x), wb, n * len(y))
    print(f"A: mean {np.mean(x):.4f} over {len(x)} runs, {wa} wrong of {n * len(x)}")
    print(f"B: mean {np.mean(y):.4f} over {len(y)} runs, {wb} wrong of {n * len(y)}")
    print(f"Welch's t = {t:.2f} ({df:.1f} degrees of freedom), two-sided p = {p_t:.2f}")
    print(f"Fisher's exact test on the pooled wrong answers: two-sided p = {p_f:.2f}")


if __name__ == "__main__":
    main()
