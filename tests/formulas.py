"""The losses written out by hand, element by element: what every method's loss test checks against."""

import math


def direct_st(z_s, z_t, T):
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), written out by hand."""
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist()):
        ps = [math.exp(v / T) for v in row_s]
        pt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    return T * T * total / len(z_s)


def direct_ce(z, y):
    """mean_b (logsumexp(z_b) - z_b[y_b])."""
    rows = zip(z.tolist(), y.tolist())
    return sum(math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in rows) / len(y)
