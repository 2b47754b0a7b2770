"""Expert selection for DeepSeek-V3-style routers in one Numba pass per token: sigmoid (or
softmax) scores, the selection bias, group-limited choice and the top k, as numallm.experts.
moe_route computes them (llama.cpp's build_moe_ffn). Plain softmax routing is fused.moe_topk.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def moe_select(logits, k, sigmoid, bias, n_group, n_group_used, renorm, min_sum, scale, ids, w):
    """Per row of logits float32 (T, E): p = sigmoid(logits) (else softmax); the choice reads
    sel = p + bias (bias float32 (E,), or empty for none); with n_group > 1 and n_group_used <
    n_group only the n_group_used groups of E / n_group experts whose two best sel sum highest
    take part (equal sums: the lower group). The k best sel (best first; equal: the lower index)
    go to ids int64 (T, k), their p to w float32 (T, k), divided by max(their sum, min_sum) when
    renorm, times scale when scale != 0."""
    n_t, n_e = logits.shape
    p = np.empty(n_e, np.float32)            # (E,) probabilities
    sel = np.empty(n_e, np.float32)          # (E,) what the choice ranks (-inf: left out)
    taken = np.zeros(n_e, np.bool_)
    grouped = n_group > 1 and n_group_used < n_group
    gsize = n_e // n_group if grouped else n_e
    score = np.empty(max(n_group, 1), np.float32)    # (groups,) two best sel summed
    keep = np.zeros(max(n_group, 1), np.bool_)
    for t in range(n_t):
        if sigmoid:
            for e in range(n_e):
                p[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[t, e]))
        else:
            m = logits[t, 0]
            for e in range(1, n_e):
                m = max(m, logits[t, e])
            s = np.float32(0.0)
            for e in range(n_e):
                p[e] = np.exp(logits[t, e] - m)
                s += p[e]
            for e in range(n_e):
                p[e] /= s
        for e in range(n_e):
            sel[e] = p[e] + bias[e] if bias.shape[0] else p[e]
            taken[e] = False
        if grouped:
            for g in range(n_group):
                a, b = -np.inf, -np.inf          # the best and second best of group g
                for e in range(g * gsize, (g + 1) * gsize):
                    v = sel[e]
                    if v > a:
                        a, b = v, a
                    elif v > b:
                        b = v
                score[g] = np.float32(b + a)
                keep[g] = False
            for _ in range(n_group_used):
                best = -1
                for g in range(n_group):
                    if not keep[g] and (best < 0 or score[g] > score[best]):
                        best = g
                keep[best] = True
            for g in range(n_group):
                if not keep[g]:
                    for e in range(g * gsize, (g + 1) * gsize):
                        sel[e] = -np.inf
        tot = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(n_e):
                if not taken[e] and (best < 0 or sel[e] > sel[best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            w[t, j] = p[best]
            tot += p[best]
        if renorm:
            d = max(tot, min_sum)
            for j in range(k):
                w[t, j] /= d
        if scale != 0:
            for j in range(k):
                w[t, j] *= scale
