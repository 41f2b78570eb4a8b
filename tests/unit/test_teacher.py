"""Teacher targets: every stored distribution equals a plain run of the target on prompt + prefix (the oracle)."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    EOS,
    left_pad,
    one_torch_thread,
    plain_logits,
    random_identifiers,
    random_prompts,
    tiny_model,
    true_scores,
)
from transformers import LlamaForCausalLM

from atspeed.decoding.decoders import DecodeSettings, decode
from atspeed.decoding.search.beam_search import beam_search
from atspeed.decoding.teaching.teacher import (
    TeacherTargets,
    Teaching,
    node_logprobs,
    on_policy_teaching,
    target_teaching,
    teacher_targets,
)
from atspeed.decoding.teaching.teacher_forest import (
    expand_to_vocab,
    gather_codes,
    level_codes,
    prefix_forest,
    truncate_top_k,
)
from atspeed.items.trie import PrefixTrie

VOCAB = 60
ATOL = 1e-5
NINF = float("-inf")
LENGTHS = [6, 2, 9]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model(VOCAB, seed=3)


def _world(levels: int, rule: str = "exact") -> tuple[torch.Tensor, PrefixTrie, list[list[int]]]:
    identifiers = random_identifiers(VOCAB, levels, seed=levels)
    trie = PrefixTrie.build(identifiers, VOCAB, rule=rule, eos_token_id=EOS)
    return identifiers, trie, random_prompts(VOCAB, LENGTHS, seed=40 + levels)


def _truth(model, trie, prompts, identifiers, num_beams: int) -> torch.Tensor:
    """Row 0: its own third beam (a ground truth the target also found); other rows: arbitrary items."""
    input_ids, mask = left_pad(prompts)
    beams = decode("beam", model, input_ids, mask, trie, DecodeSettings(num_beams, trie.levels)).sequences
    picks = torch.tensor([5, 123, 77, 301])[: len(prompts)] % identifiers.shape[0]
    truth = identifiers[picks].clone()
    truth[0] = beams[0, min(2, num_beams - 1)]
    return truth


def _run(model, levels: int, num_beams: int, rule: str = "exact", **kw):
    identifiers, trie, prompts = _world(levels, rule)
    truth = _truth(model, trie, prompts, identifiers, num_beams)
    input_ids, mask = left_pad(prompts)
    out = teacher_targets(model, input_ids, mask, truth, trie, num_beams, **kw)
    return out, trie, prompts, identifiers


def _prefix(out: TeacherTargets, row: int, node: int) -> tuple[int, ...]:
    """A node's prefix, read by walking its parents."""
    tokens = []
    while node > 0:
        tokens.append(int(out.node_token[row, node]))
        node = int(out.node_parent[row, node])
    assert node == 0, "every chain ends at the root"
    return tuple(reversed(tokens))


def _sequences(out: TeacherTargets, row: int) -> list[tuple[list[int], list[int]]]:
    """(sequence, its prefix nodes) for every beam and the ground truth of ``row``."""
    pairs = list(zip(out.beams[row].tolist(), out.beam_nodes[row].tolist(), strict=True))
    return [*pairs, (out.truth[row].tolist(), out.truth_nodes[row].tolist())]


@pytest.mark.parametrize(("levels", "num_beams", "rule"), [(3, 5, "exact"), (4, 8, "exact"), (3, 4, "per_position")])
@torch.no_grad()
def test_every_stored_distribution_equals_a_plain_run_of_prompt_plus_prefix(model, levels, num_beams, rule) -> None:
    """The slow oracle: for every row, beam, the ground truth and position t, the stored entries at level t's codes
    equal log_softmax(logits of prompt + y_<t, run alone) where the trie allows the code, and -inf elsewhere."""
    out, trie, prompts, _ = _run(model, levels, num_beams, rule)
    codes = level_codes(trie)
    for row, prompt in enumerate(prompts):
        for sequence, nodes in _sequences(out, row):
            for t in range(levels):
                ref = torch.log_softmax(plain_logits(model, prompt + sequence[:t])[-1], -1)  # [V]
                allowed = set(trie.allowed_tokens(sequence[:t]))
                stored = out.node_logprobs[row, nodes[t]]  # [C]
                for column, code in enumerate(codes[t].tolist()):
                    if code in allowed:
                        torch.testing.assert_close(stored[column], ref[code], atol=ATOL, rtol=0)
                    else:
                        assert stored[column] == NINF, (row, t, code)
                assert int(torch.isfinite(stored).sum()) == len(allowed)


@torch.no_grad()
def test_beams_and_scores_are_those_of_the_beam_decoder(model) -> None:
    """beams and scores are decode("beam")'s; each beam's score is the sum of its tokens' stored entries."""
    out, trie, prompts, _ = _run(model, 3, 6)
    input_ids, mask = left_pad(prompts)
    ref = decode("beam", model, input_ids, mask, trie, DecodeSettings(6, 3))
    assert torch.equal(out.beams, ref.sequences)
    torch.testing.assert_close(out.scores, ref.scores, atol=0, rtol=0)
    per_token = expand_to_vocab(out.along(out.beam_nodes), out.codes, VOCAB).gather(-1, out.beams[..., None])
    torch.testing.assert_close(per_token[..., 0].sum(-1), out.scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_tree_holds_each_distinct_prefix_once_and_positions_map_to_their_prefix(model) -> None:
    """K_t = 20: valid nodes are exactly the distinct prefixes of length 0..L-1 of beams + truth, each once, parents
    before children; every position t of every sequence maps to the node of y_<t; beams share prefixes."""
    out, _, prompts, _ = _run(model, 3, 20)
    levels = 3
    shared = False
    for row in range(len(prompts)):
        count = int(out.node_valid[row].sum())
        assert out.node_valid[row, :count].all() and not out.node_valid[row, count:].any()
        prefixes = [_prefix(out, row, node) for node in range(count)]
        assert len(set(prefixes)) == count
        assert [len(p) for p in prefixes] == out.node_depth[row, :count].tolist()
        assert (out.node_parent[row, 1:count] < torch.arange(1, count)).all()
        expected = {tuple(seq[:t]) for seq, _ in _sequences(out, row) for t in range(levels)}
        assert set(prefixes) == expected
        shared |= count < 1 + 21 * (levels - 1)
        for sequence, nodes in _sequences(out, row):
            assert [prefixes[n] for n in nodes] == [tuple(sequence[:t]) for t in range(levels)]
    assert shared, "20 beams over a trie of ~7 children per node should share some non-root prefix"


@torch.no_grad()
def test_padding_nodes_are_invalid_and_unused(model) -> None:
    """Rows with fewer nodes than M: padding nodes are invalid, have no parent or token, no finite entry, and no
    position maps to them."""
    out, _, prompts, _ = _run(model, 4, 5)
    counts = out.node_valid.sum(1)
    assert int(counts.min()) < out.node_valid.shape[1], "the test needs rows of different node counts"
    for row in range(len(prompts)):
        pad = ~out.node_valid[row]
        assert (out.node_parent[row, pad] == -1).all() and (out.node_token[row, pad] == -1).all()
        assert not torch.isfinite(out.node_logprobs[row, pad]).any()
        used = torch.cat([out.beam_nodes[row].reshape(-1), out.truth_nodes[row]])
        assert (used < counts[row]).all()


@torch.no_grad()
def test_a_batch_equals_single_runs(model) -> None:
    """Prompts of lengths 6, 2, 9 in one left-padded batch give each row what the prompt gives alone."""
    identifiers, trie, prompts = _world(3)
    truth = _truth(model, trie, prompts, identifiers, 5)
    input_ids, mask = left_pad(prompts)
    batch = teacher_targets(model, input_ids, mask, truth, trie, 5)
    for row, prompt in enumerate(prompts):
        ids, m = left_pad([prompt])
        single = teacher_targets(model, ids, m, truth[row : row + 1], trie, 5)
        count = single.node_valid.shape[1]
        assert int(batch.node_valid[row].sum()) == count
        for name in ("beams", "beam_nodes", "truth_nodes"):
            assert torch.equal(getattr(batch, name)[row], getattr(single, name)[0]), name
        for name in ("node_parent", "node_token", "node_depth"):
            assert torch.equal(getattr(batch, name)[row, :count], getattr(single, name)[0]), name
        torch.testing.assert_close(batch.scores[row], single.scores[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batch.node_logprobs[row, :count], single.node_logprobs[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_ground_truth_that_is_a_beam_shares_its_nodes(model) -> None:
    """Row 0's ground truth is its third beam: same nodes at every position, and no extra node for it."""
    out, _, _, _ = _run(model, 3, 5)
    assert torch.equal(out.truth_nodes[0], out.beam_nodes[0, 2])
    assert int(out.node_valid[0].sum()) == len({tuple(s[:t]) for s in out.beams[0].tolist() for t in range(3)})


@torch.no_grad()
def test_top_k_truncation_keeps_the_k_largest_allowed_codes(model) -> None:
    """With top_k = 3 each node keeps min(3, allowed) codes, the largest ones, at their untruncated values."""
    full, *_ = _run(model, 3, 5)
    cut, *_ = _run(model, 3, 5, top_k=3)
    assert torch.equal(cut.beam_nodes, full.beam_nodes)
    finite_full, finite_cut = torch.isfinite(full.node_logprobs), torch.isfinite(cut.node_logprobs)
    assert torch.equal(finite_cut.sum(-1), finite_full.sum(-1).clamp(max=3))
    assert (finite_cut <= finite_full).all()
    torch.testing.assert_close(cut.node_logprobs[finite_cut], full.node_logprobs[finite_cut], atol=0, rtol=0)
    dropped = full.node_logprobs.masked_fill(finite_cut | ~finite_full, NINF).amax(-1)  # best dropped value
    kept = cut.node_logprobs.masked_fill(~finite_cut, float("inf")).amin(-1)  # worst kept value
    assert (dropped <= kept).all()


def test_results_can_enter_a_loss_with_gradients(model) -> None:
    """The results are ordinary tensors (not inference tensors): autograd may save them for a student's backward."""
    out, *_ = _run(model, 3, 4)
    student = torch.zeros(out.node_logprobs.shape, requires_grad=True)
    loss = (student * out.node_logprobs).sum() + (student[:, :4, 0] * out.scores).sum()
    loss.backward()
    assert student.grad is not None
    assert torch.equal(student.grad[:, 1:4, 0], out.node_logprobs[:, 1:4, 0] + out.scores[:, 1:4])


def test_truncate_top_k_by_hand() -> None:
    values = torch.tensor([[-1.0, -3.0, NINF, -0.5, -2.0], [NINF, -1.0, NINF, NINF, NINF]])
    cut = truncate_top_k(values, 2)
    assert cut.tolist() == [[-1.0, NINF, NINF, -0.5, NINF], [NINF, -1.0, NINF, NINF, NINF]]


@torch.no_grad()
def test_float16_storage_and_disallowed_codes_never_finite(model) -> None:
    """dtype=float16 stores the same values rounded; finite entries are exactly the trie's allowed codes."""
    full, trie, *_ = _run(model, 3, 5)
    half, *_ = _run(model, 3, 5, dtype=torch.float16)
    assert half.node_logprobs.dtype == torch.float16
    torch.testing.assert_close(half.node_logprobs.float(), full.node_logprobs, atol=1e-2, rtol=1e-3)
    codes = full.codes[full.node_depth]  # [B, M, C]
    for row in range(codes.shape[0]):
        for node in range(int(full.node_valid[row].sum())):
            allowed = set(trie.allowed_tokens(list(_prefix(full, row, node))))
            finite = set(codes[row, node][torch.isfinite(half.node_logprobs[row, node])].tolist())
            assert finite == allowed


def test_level_codes_are_each_levels_sorted_distinct_tokens() -> None:
    identifiers = torch.tensor([[5, 9, 7], [5, 8, 7], [6, 9, 4], [3, 9, 4]])
    trie = PrefixTrie.build(identifiers, 12, eos_token_id=EOS)
    assert level_codes(trie).tolist() == [[3, 5, 6], [8, 9, -1], [4, 7, -1]]
    ids = random_identifiers(VOCAB, 4, seed=9)
    codes = level_codes(PrefixTrie.build(ids, VOCAB, rule="per_position"))
    for t in range(4):
        real = codes[t][codes[t] >= 0]
        assert torch.equal(real, torch.unique(ids[:, t]))


def test_gather_codes_and_expand_to_vocab_round_trip() -> None:
    """gather_codes reads [..., V] at code columns (padding -inf); expand_to_vocab puts them back, -inf elsewhere."""
    codes = torch.tensor([[1, 4, -1], [0, 2, 3]])  # [L = 2, C = 3]
    logits = torch.randn(2, 5, 2, 6)  # [B, N, L, V]
    compact = gather_codes(logits, codes)  # [B, N, L, C]
    assert compact.shape == (2, 5, 2, 3)
    assert torch.equal(compact[..., 0, :2], logits[..., 0, [1, 4]]) and (compact[..., 0, 2] == NINF).all()
    back = expand_to_vocab(compact, codes, 6)
    assert torch.equal(back[..., 0, [1, 4]], logits[..., 0, [1, 4]])
    assert (back[..., 0, [0, 2, 3, 5]] == NINF).all()
    assert torch.equal(back[..., 1, [0, 2, 3]], logits[..., 1, [0, 2, 3]])


def test_prefix_forest_by_hand() -> None:
    """Two sequences sharing their first token, plus a repeat of the first: 1 root + 2 depth-1 + ... nodes."""
    sequences = torch.tensor([[[4, 5, 6], [4, 7, 8], [4, 5, 6], [9, 5, 6]]])  # [1, N = 4, L = 3]
    forest = prefix_forest(sequences)
    # nodes: 0 (), 1 (4,), 2 (9,), 3 (4, 5), 4 (4, 7), 5 (9, 5)
    assert forest.slot_node[0].tolist() == [[0, 1, 3], [0, 1, 4], [0, 1, 3], [0, 2, 5]]
    assert forest.parent[0].tolist() == [-1, 0, 0, 1, 1, 2]
    assert forest.token[0].tolist() == [-1, 4, 9, 5, 7, 5]
    assert forest.depth[0].tolist() == [0, 1, 1, 2, 2, 2]
    anc = forest.ancestors[0]
    assert [set(anc[i].nonzero()[:, 0].tolist()) for i in range(6)] == [{0}, {1}, {2}, {1, 3}, {1, 4}, {2, 5}]


@torch.no_grad()
def test_single_level_identifiers_need_only_the_prefill(model) -> None:
    """L = 1: only the root, whose distribution is the prompt's last logits."""
    out, _, prompts, _ = _run(model, 1, 4)
    assert out.node_valid.shape[1] == 1 and out.beam_nodes.unique().tolist() == [0]
    for row, prompt in enumerate(prompts):
        ref = torch.log_softmax(plain_logits(model, prompt)[-1], -1)
        codes = out.codes[0]
        torch.testing.assert_close(out.node_logprobs[row, 0], ref[codes], atol=ATOL, rtol=0)


def test_bad_inputs_fail_with_a_message(model) -> None:
    identifiers, trie, prompts = _world(3)
    input_ids, mask = left_pad(prompts)
    truth = identifiers[:3].clone()
    with pytest.raises(ValueError, match="top_k"):
        teacher_targets(model, input_ids, mask, truth, trie, 3, top_k=0)
    with pytest.raises(ValueError, match="truth must be"):
        teacher_targets(model, input_ids, mask, truth[:, :2], trie, 3)
    bad = truth.clone()
    bad[1, 2] = 3  # token 3 is never an identifier token
    with pytest.raises(ValueError, match="not allowed by the trie"):
        teacher_targets(model, input_ids, mask, bad, trie, 3)


# -- the distribution part alone: what the alignment computes on the fly ---------------------------------


@pytest.mark.parametrize("top_k", [None, 3])
@torch.no_grad()
def test_node_logprobs_is_exactly_what_teacher_targets_stores(model, top_k) -> None:
    """For the same sequences (beams + truth), ``node_logprobs`` gives teacher_targets' tree and values, bit for bit,
    in float32."""
    out, trie, prompts, _ = _run(model, 3, 5, top_k=top_k)
    input_ids, mask = left_pad(prompts)
    sequences = torch.cat([out.beams, out.truth[:, None]], 1)
    forest, values = node_logprobs(model, input_ids, mask, sequences, trie, out.codes, top_k)
    assert values.dtype == torch.float32
    assert torch.equal(values, out.node_logprobs)
    for name in ("parent", "token", "depth", "valid"):
        assert torch.equal(getattr(forest, name), getattr(out, f"node_{name}")), name
    assert torch.equal(forest.slot_node[:, :-1], out.beam_nodes) and torch.equal(
        forest.slot_node[:, -1], out.truth_nodes
    )


@torch.no_grad()
def test_recomputed_teaching_equals_the_stored_one_and_rescores_the_beams(model) -> None:
    """target_teaching on the target's own beams: the stored (float16) data's tree, its values up to float16
    rounding, and, without scores, the beams' beam-search scores as the sums of their tokens' entries."""
    full, trie, prompts, _ = _run(model, 3, 5)
    half, *_ = _run(model, 3, 5, dtype=torch.float16)
    input_ids, mask = left_pad(prompts)
    stored = Teaching.stored(half.beams, half.scores, half.truth, half.node_logprobs, trie, half.codes)
    kept = target_teaching(model, input_ids, mask, full.beams, full.truth, trie, full.codes, full.scores)
    rescored = target_teaching(model, input_ids, mask, full.beams, full.truth, trie, full.codes)
    assert torch.equal(kept.forest.slot_node, stored.forest.slot_node) and kept.scores is full.scores
    assert stored.logprobs.dtype == torch.float32 and not kept.on_policy
    torch.testing.assert_close(stored.logprobs, kept.logprobs, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(rescored.scores, full.scores, atol=1e-5, rtol=0)
    assert torch.equal(stored.allowed, kept.allowed) and torch.equal(kept.allowed, kept.logprobs.isfinite())


@torch.no_grad()
def test_truncated_teacher_data_keeps_the_tries_mask(model) -> None:
    """Teacher data kept to the target's top 1 code: the stored values are finite at one code per node, but the
    teaching's mask is still every code the trie allows there (what the untruncated data's finite entries are)."""
    full, trie, _, _ = _run(model, 3, 5)
    cut, *_ = _run(model, 3, 5, top_k=1)
    stored = Teaching.stored(cut.beams, cut.scores, cut.truth, cut.node_logprobs, trie, cut.codes)
    assert torch.equal(stored.allowed, full.node_logprobs.isfinite())
    assert bool((stored.allowed.sum(-1) > stored.logprobs.isfinite().sum(-1)).any()), "the cut is real"


@torch.no_grad()
def test_teacher_targets_without_distributions_keeps_the_beams(model) -> None:
    full, *_ = _run(model, 3, 5)
    beams_only, *_ = _run(model, 3, 5, distributions=False)
    assert beams_only.node_logprobs is None
    for name in ("beams", "scores", "truth", "beam_nodes", "truth_nodes"):
        assert torch.equal(getattr(beams_only, name), getattr(full, name)), name


@torch.no_grad()
def test_on_policy_teaching_scores_the_drafts_sampled_beams_under_the_target(model) -> None:
    """The beams are the draft's sampling beam search (same generator seed, same beams); the scores are the target's
    cumulative log-probabilities of them (the oracle: plain runs of prompt + beam)."""
    draft = tiny_model(VOCAB, seed=11, hidden=16, layers=1)
    identifiers, trie, prompts = _world(3)
    truth = _truth(model, trie, prompts, identifiers, 4)
    input_ids, mask = left_pad(prompts)
    codes = level_codes(trie)
    got = on_policy_teaching(model, draft, input_ids, mask, truth, trie, codes, 4, torch.Generator().manual_seed(7))
    sampled = beam_search(draft, input_ids, mask, trie, 4, 3, sample=True, generator=torch.Generator().manual_seed(7))
    assert got.on_policy and torch.equal(got.beams, sampled.sequences) and torch.equal(got.truth, truth)
    own = target_teaching(model, input_ids, mask, got.beams, truth, trie, codes)
    assert torch.equal(got.logprobs, own.logprobs) and torch.equal(got.forest.slot_node, own.forest.slot_node)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(got.scores[row], true_scores(model, prompt, got.beams[row]), atol=1e-4, rtol=0)
    target_beams = decode("beam", model, input_ids, mask, trie, DecodeSettings(4, 3)).sequences
    assert not torch.equal(got.beams, target_beams), "the draft's beams, not the target's"
