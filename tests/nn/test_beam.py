"""RelaxedBeamStep / beam_select / beam_gather: BT-Cell's one-soft-slot beam relaxation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import softtopk
from softtopk.nn import RelaxedBeamStep
from softtopk.nn.functional import BEAM_METHODS, beam_gather, beam_select


def test_one_soft_slot_against_its_definition():
    scores = torch.randn(4, 10, dtype=torch.float64)
    sel = beam_select(scores, 3, temperature=0.7)
    for r in range(4):
        order = sorted(range(10), key=lambda i: -scores[r, i].item())
        for j in range(2):  # hard slots: the top beam - 1
            assert sel.weights[r, j].tolist() == F.one_hot(torch.tensor(order[j]), 10).double().tolist()
        rest = order[2:]
        soft = torch.softmax(scores[r, rest] / 0.7, 0)
        expected = torch.zeros(10, dtype=torch.float64)
        expected[rest] = soft
        torch.testing.assert_close(sel.weights[r, 2], expected)
        assert sel.indices[r].tolist() == order[:3]
    torch.testing.assert_close(sel.scores, (sel.weights * scores.unsqueeze(1)).sum(-1))
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(4, 3, dtype=torch.float64))


def test_hard_method_is_beam_search_and_limits():
    scores = torch.randn(3, 12)
    hard = beam_select(scores, 4, method="hard")
    top = torch.topk(scores, 4)
    assert torch.equal(hard.indices, top.indices)
    torch.testing.assert_close(hard.scores, top.values)
    cold = beam_select(scores, 4, temperature=1e-4)  # the soft slot tends to the 4th best
    torch.testing.assert_close(cold.scores, top.values, atol=1e-3, rtol=0)
    assert set(BEAM_METHODS) >= {"hard", "one-soft"}
    # beam == M: the soft slot is the last candidate alone.
    full = beam_select(scores, 12)
    assert torch.equal(full.weights.sum(1), torch.ones(3, 12))


def test_invalid_candidates():
    scores = torch.tensor([[2.0, -math.inf, 1.0, -math.inf], [0.5, -math.inf, -math.inf, -math.inf]])
    sel = beam_select(scores, 2)
    assert not torch.isnan(sel.weights).any() and not torch.isnan(sel.scores).any()
    torch.testing.assert_close(sel.scores[0], torch.tensor([2.0, 1.0]))
    assert sel.scores[1, 1] == -math.inf  # no valid candidate left for the second beam
    # Gradients stay finite next to -inf candidates (w * s with w = 0, s = -inf is masked twice).
    finite = torch.tensor([[2.0, -math.inf, 1.0, 0.5, -math.inf]], requires_grad=True)
    beam_select(finite, 2).scores.sum().backward()
    assert torch.isfinite(finite.grad).all() and finite.grad[0, 3] != 0


def test_gradient_reaches_discarded_candidates():
    scores = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    states = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    out = RelaxedBeamStep(3)(scores, states)
    out.states.sum().backward()
    dropped = torch.ones(2, 9, dtype=torch.bool).scatter(1, torch.topk(scores, 3).indices, False)
    assert (scores.grad[dropped] != 0).all()  # every discarded candidate receives a gradient
    scores.grad = None
    RelaxedBeamStep(3, method="hard")(scores, states).states.sum().backward()
    assert scores.grad is None or (scores.grad == 0).all()


def test_gather_any_trailing_shape_and_tuples():
    w = beam_select(torch.randn(2, 6), 2).weights
    s1, s2 = torch.randn(2, 6, 3, 4), torch.randn(2, 6)
    out = RelaxedBeamStep(2)(torch.randn(2, 6), (s1, s2))
    assert out.states[0].shape == (2, 2, 3, 4) and out.states[1].shape == (2, 2)
    torch.testing.assert_close(beam_gather(s1, w), torch.einsum("bkm,bmxy->bkxy", w, s1))


def test_module_equals_function_state_dict_gradcheck():
    step = RelaxedBeamStep(2, temperature=0.5)
    scores, states = torch.randn(3, 7), torch.randn(3, 7, 4)
    out = step(scores, states)
    sel = beam_select(scores, 2, temperature=0.5)
    torch.testing.assert_close(out.weights, sel.weights)
    torch.testing.assert_close(out.states, beam_gather(states, sel.weights))
    restored = RelaxedBeamStep(1)
    restored.load_state_dict(step.state_dict())
    buffer = io.BytesIO()
    torch.save(step, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(scores, states).states, out.states)
    s64 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h64 = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: step(a, b).states, (s64, h64))


@pytest.mark.slow
def test_compile_equals_eager():
    step = RelaxedBeamStep(3)
    scores, states = torch.randn(4, 12), torch.randn(4, 12, 5)
    got, want = torch.compile(step, fullgraph=True)(scores, states), step(scores, states)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_a_small_seq2seq_beam_search_trains_end_to_end():
    """Beam search over a toy decoder; the loss on the final beams trains through every step."""
    torch.manual_seed(0)
    V, H, B, T = 6, 16, 3, 4
    embed, cell, out = torch.nn.Embedding(V, H), torch.nn.GRUCell(H, H), torch.nn.Linear(H, V)
    target = torch.tensor([1, 4, 2, 5])  # the sequence the search should find
    step = RelaxedBeamStep(B)
    params = [*embed.parameters(), *cell.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)

    def search():
        h = torch.zeros(1, B, H)  # (batch, beam, H)
        scores = torch.tensor([[0.0, -math.inf, -math.inf]])  # one live beam at the start
        seq = torch.zeros(1, B, 0)
        for _ in range(T):
            logp = torch.log_softmax(out(h), -1)  # (1, B, V)
            cand = (scores.unsqueeze(-1) + logp).reshape(1, B * V)
            tokens = torch.arange(V).repeat(B).reshape(1, B * V).float()
            parent_h = h.repeat_interleave(V, 1)
            new_h = cell(embed(tokens.long()).reshape(-1, H), parent_h.reshape(-1, H)).reshape(1, B * V, H)
            parent_seq = seq.repeat_interleave(V, 1)
            cand_seq = torch.cat([parent_seq, tokens.unsqueeze(-1)], -1)
            res = step(cand, (new_h, cand_seq))
            scores, (h, seq) = res.scores, res.states
        return scores, seq

    def target_logprob():
        h, total = torch.zeros(1, H), 0.0
        for tok in target:
            total = total + torch.log_softmax(out(h), -1)[0, tok]
            h = cell(embed(tok.view(1)), h)
        return total

    for _ in range(40):
        scores, seq = search()
        # Raise the target's score and push the best beam towards it (soft slots included).
        loss = -target_logprob() + F.relu(scores[0, 0] - target_logprob().detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, seq = search()
    assert seq[0, 0].round().long().tolist() == target.tolist()


def test_sorted_soft_method_is_softs_sorted_indicators():
    """method="soft": every slot soft, W = SOFT's sorted indicators; t -> 0 is beam search."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 9, dtype=torch.float64, generator=g).requires_grad_()
    sel = beam_select(scores, 3, method="soft", temperature=0.2)
    want = softtopk.topk_indicators(scores, 3, method="soft", temperature=0.2)
    torch.testing.assert_close(sel.weights, want)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(4, 3, dtype=torch.float64))
    assert bool((sel.weights[:, :, :] > 0).sum(-1).min() > 1)  # every slot mixes candidates
    sel.scores.sum().backward()
    assert bool((scores.grad != 0).all())  # the discarded candidates get gradient too
    # t -> 0: the hard beam. SOFT normalises its cost by the largest cost, so the scale
    # where it turns hard is small (unit-spaced scores: epsilon ~ 1e-3).
    spaced = torch.stack([torch.randperm(9, generator=g) for _ in range(4)]).double()
    hard = beam_select(spaced, 3, method="hard")
    gaps = []
    for t in (0.02, 0.01, 0.005):
        cold = beam_select(spaced, 3, method="soft", temperature=t)
        assert cold.indices.tolist() == hard.indices.tolist()
        gaps.append((cold.weights - hard.weights).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.1


def test_sorted_soft_method_with_fewer_valid_candidates_than_beams():
    scores = torch.tensor([[0.5, -math.inf, 2.0, -math.inf], [-math.inf, 1.0, -math.inf, -math.inf]])
    sel = beam_select(scores, 3, method="soft", temperature=0.5)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(2, 3))
    assert sel.scores[0, 2] == -math.inf and sel.scores[1, 1] == -math.inf
    assert bool(torch.isfinite(sel.scores[0, :2]).all()) and sel.scores[1, 0] == 1.0
    finite = scores.clone().requires_grad_()
    s = beam_select(finite, 3, method="soft", temperature=0.5).scores
    s[torch.isfinite(s)].sum().backward()
    assert bool(torch.isfinite(finite.grad).all())


def test_bad_input():
    with pytest.raises(ValueError, match="beam must be"):
        beam_select(torch.randn(2, 5), 6)
    with pytest.raises(ValueError, match="method"):
        beam_select(torch.randn(2, 5), 2, method="sorted")
    with pytest.raises(ValueError, match="temperature"):
        RelaxedBeamStep(2, temperature=0.0)
    with pytest.raises(ValueError, match="states must start"):
        beam_gather(torch.randn(2, 4, 3), torch.rand(2, 2, 5))
