"""Tests of the miniature InstructGPT world (recipes/world.py): pure Python, a few seconds."""
import os
import random
import re
import string

import pytest

from recipes.world import (CONSTRAINTS, SCREEN_POOL, SIZES, TEMPLATES, WEIGHTS, Labeler, World, _prose,
                           agreement, decorate, decorate_all, strip_decoration, win_rate)

TRAIN_SPLITS = ("sft", "rm", "ppo")


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def corpus(world):
    return world.pretrain_corpus(400_000)


def _instruction(p):
    """The instruction without the constraint suffix and the answer cue."""
    text = p.text[len("Q: "):-len("\nA:")]
    for suffix in CONSTRAINTS.values():
        text = text.removesuffix(suffix)
    return text


def _find(world, task, constraint=None, harmful=False):
    """The first "rm" prompt of a kind."""
    for p in world.prompts(400, "rm"):
        if p.task == task and p.constraint == constraint and p.harmful == harmful:
            return p
    raise AssertionError(f"no {task}/{constraint} prompt")


def test_determinism_and_seed_dependence():
    a, b, c = World(0), World(0), World(1)
    assert a.prompts(200, "sft") == b.prompts(200, "sft")
    assert a.prompts(200, "eval") == b.prompts(200, "eval")
    assert a.demonstrations(200) == b.demonstrations(200)
    assert a.pretrain_corpus(50_000) == b.pretrain_corpus(50_000)
    assert [l.weights for l in a.labelers()] == [l.weights for l in b.labelers()]
    assert a.prompts(200, "sft") != c.prompts(200, "sft")
    assert a.pretrain_corpus(50_000) != c.pretrain_corpus(50_000)
    assert [l.weights for l in a.labelers()] != [l.weights for l in c.labelers()]
    # a longer request extends a shorter one; splits are different streams
    assert a.prompts(300, "rm")[:100] == a.prompts(100, "rm")
    assert a.prompts(100, "rm") != a.prompts(100, "ppo")
    with pytest.raises(ValueError):
        a.prompts(10, "test")


def test_prompt_format_and_mix(world):
    ps = world.prompts(2000, "sft")
    assert all(p.text.startswith("Q: ") and p.text.endswith("\nA:") for p in ps)
    assert max(len(p.text) for p in ps) < 60 and max(len(p.answer or "") for p in ps) <= 15
    harmful = [p for p in ps if p.harmful]
    assert 0.1 < len(harmful) / len(ps) < 0.2
    assert all(p.answer is None and p.constraint is None and p.task == "harmful" for p in harmful)
    benign = [p for p in ps if not p.harmful]
    assert 0.45 < sum(p.constraint is not None for p in benign) / len(benign) < 0.55
    for p in benign:  # the constraint is visible in the prompt text
        assert (CONSTRAINTS[p.constraint] in p.text) if p.constraint else ("(" not in p.text)
    assert {p.task for p in benign} == {"reverse", "first", "last", "count", "copy", "upper"}


def test_eval_disjoint_and_heldout_templates(world, corpus):
    train = [p for s in TRAIN_SPLITS for p in world.prompts(2000, s)]
    ev = world.prompts(1000, "eval")
    assert not any(p.heldout_template for p in train)
    assert all(p.template < len(TEMPLATES[p.task]) - 1 for p in train)
    share = sum(p.heldout_template for p in ev) / len(ev)
    assert 0.18 < share < 0.32
    assert not {_instruction(p) for p in train} & {_instruction(p) for p in ev}
    # instance level: no word reversed in eval is ever reversed in training
    rev = lambda ps: {p.answer for p in ps if p.task == "reverse"}
    assert rev(ev) and not rev(train) & rev(ev)
    # eval instances stay out of pretraining, whose held-out phrasings do appear there
    assert not any(f"Q: {_instruction(p)}" in corpus for p in ev if not p.harmful)
    assert "Flip the letters of" in corpus and "Tell me how long" in corpus


def test_demonstrations_are_sloppy_about_decoration_only(world):
    ps = world.prompts(3000, "sft")
    rng = random.Random(0)
    demos = [(p, world.demonstration(p, rng)) for p in ps]
    assert all(r.startswith(" ") and r.strip() for _, r in demos)
    constrained = [world.followed_constraint(p, r) for p, r in demos if p.constraint]
    assert 0.25 < sum(constrained) / len(constrained) < 0.35
    plain = [strip_decoration(r)[1] for p, r in demos if not p.harmful and not p.constraint]
    assert 0.06 < sum(bool(d) for d in plain) / len(plain) < 0.14
    assert all(world.correct(p, r) for p, r in demos if not p.harmful)
    harmful = [(p, r) for p, r in demos if p.harmful]
    assert all(world.quality(p, r)["refusal"] == 1 and not world.is_toxic(r) for p, r in harmful)
    listed = world.demonstrations(50)
    assert listed[0].keys() == {"prompt", "response"}
    assert [d["prompt"] for d in listed] == [p.text for p in world.prompts(50, "sft")]


def test_corpus_continues_instead_of_following(world, corpus):
    assert 390_000 <= len(corpus) <= 400_000
    docs = corpus.split("\n\n")
    items = re.findall(r"^Q: (.*)\nA:(.*)$", corpus, flags=re.M)
    instr_chars = sum(len(d) for d in docs if d.startswith("Q: "))
    assert 0.3 < instr_chars / len(corpus) < 0.5
    assert "First Citizen" in corpus or "ROMEO" in corpus or "KING" in corpus  # prose
    rev = [(m.group(1), a.strip()) for q, a in items if (m := re.fullmatch(r"Reverse the letters ([a-z ]+)\.", q))]
    right = sum(strip_decoration(a)[0] == w[::-1] for w, a in rev) / len(rev)
    assert 0.2 < right < 0.55  # a latent skill to draw on, mostly not followed
    assert sum(a.startswith(" Q") or a.strip()[:1].isupper() for _, a in items) / len(items) > 0.2
    harm_res = [re.escape(t).replace(re.escape("{name}"), ".+") for t in TEMPLATES["harmful"]]
    is_harm = lambda q: any(re.fullmatch(h, q) for h in harm_res)
    harm = [a for q, a in items if is_harm(q)]
    assert len(harm) > 50
    assert 0.6 < sum(world.is_toxic(a) for a in harm) / len(harm) < 0.95
    benign = [a for q, a in items if not is_harm(q)]
    assert sum(world.is_toxic(a) for a in benign) == 0
    prose = [d for d in docs if not d.startswith("Q: ")]
    assert not any(world.is_toxic(d) for d in prose[:200])
    held = world.heldout_prose()
    assert 90_000 < len(held) < 101_000 and held[:200] not in corpus


def test_prose_part_is_the_corpus_prose_without_qa_items(corpus):
    """The LM terms' data: every prose document of the corpus, in order, and no Q/A item."""
    part = World.prose_part(corpus)
    train_prose = _prose()[0]
    docs = corpus.split("\n\n")
    kept = part.split("\n\n")
    assert kept == [d for d in docs if not d.startswith("Q: ")]
    assert "\nA:" not in part and not re.search(r"^Q: ", part, flags=re.M)
    assert all(d in train_prose for d in kept[:-1])  # the last one may be cut at n_chars
    assert 0.5 < len(part) / len(corpus) < 0.7
    assert len(kept) + sum(d.startswith("Q: ") for d in docs) == len(docs)


def test_quality_orders_responses(world):
    p = _find(world, "reverse")
    right, wrong = " " + p.answer, " " + p.answer[1:] + p.answer[0]
    q = lambda r, pr=p: world.quality(pr, r)["total"]
    assert set(world.quality(p, right)) == set(WEIGHTS) | {"total"}
    assert q(right) > q(wrong)
    assert q(right) > q(" " + p.answer[:1]) and q(wrong) > q(" " + p.answer[:1])  # too short
    assert q(wrong) > q(" ")  # empty
    assert q(right) > q(right + "!") and q(right) > q(" [" + p.answer + "]")  # unasked decoration
    assert q(right) > q(right + " and that is my answer, thank you")  # rambling
    refusal = " Sorry, I can't help with that."  # refusing a benign prompt is worse than trying
    assert q(wrong) > q(refusal) and world.quality(p, refusal)["refusal"] == -1
    assert q(right) > q(" " + p.answer + " you moron") + 0.3  # toxic
    for c in CONSTRAINTS:
        pc = _find(world, "count", constraint=c)
        followed = " " + decorate(pc.answer, c)
        assert world.followed_constraint(pc, followed) and not world.followed_constraint(pc, " " + pc.answer)
        assert world.correct(pc, followed)
        assert q(followed, pc) > q(" " + pc.answer, pc)
        other = "bang" if c == "smiley" else "smiley"
        assert q(" " + pc.answer, pc) > q(" " + decorate(pc.answer, other), pc)  # wrong decoration
    assert world.followed_constraint(p, right) is None
    h = _find(world, "harmful", harmful=True)
    refuse, toxic, chat = " Sorry, I can't help with that.", " Bob is a moron.", " Nice weather today."
    assert q(refuse, h) > q(chat, h) > q(toxic, h) + 0.3
    assert q(refuse, h) > q(" Sorry", h)  # truncated refusal
    assert world.is_toxic(toxic) and world.is_toxic(" JERKS") and not world.is_toxic(refuse)


def test_labelers_distinct_noisy_and_agreeing(world):
    train, held = world.labelers(), world.labelers(heldout=True)
    assert len(train) == len(held) == 4
    assert not {l.id for l in train} & {l.id for l in held}
    weights = [tuple(l.weights.values()) for l in train + held]
    assert len(set(weights)) == 8
    assert all(0.05 <= l.noise <= 0.2 for l in train + held)
    ps = world.prompts(1500, "rm")
    rng = random.Random(3)
    pairs = [(world.sample_response(p, rng), world.sample_response(p, rng)) for p in ps]
    ag_train = agreement(train, world, ps, pairs, seed=0)
    ag_all = agreement(train + held, world, ps, pairs, seed=0)
    # training labelers are screened (World.labelers): they agree more with each other
    assert 0.72 < ag_all < 0.90 and ag_all < ag_train < 0.92
    # a labeler judging the same pair twice is not deterministic, but better answers win (a
    # close call: the right answer against itself with an unasked "!"; a wrong answer loses
    # every time now that correctness weighs 0.5)
    p = _find(world, "reverse")
    lab = train[0]
    votes = [lab.compare(p, " " + p.answer, " " + p.answer + "!", rng) for _ in range(300)]
    assert 0.65 < sum(votes) / len(votes) < 1.0


def test_rank_is_dense_with_ties(world):
    p = _find(world, "reverse", constraint="bang")
    lab = world.labelers()[1]
    rng = random.Random(0)
    resp = [" " + p.answer + "!", " zz", " " + p.answer + "!", " ", " " + p.answer]
    for _ in range(20):
        r = lab.rank(p, resp, rng)
        assert r[0] == r[2] and len(set(r)) == 4 and sorted(set(r)) == [0, 1, 2, 3]
    assert lab.compare(p, resp[0], resp[2], rng) == 0.5
    assert lab.rank(p, [" a"], rng) == [0]


def test_rm_candidates_add_decorated_truncated_and_corrupted(world):
    p = _find(world, "copy")
    rng = random.Random(1)
    samples = [" " + p.answer, " " + p.answer, " xyz"]
    cands = world.rm_candidates(p, samples, rng)
    assert len(cands) == 6 and cands[:3] == samples and all(c.startswith(" ") for c in cands)
    assert strip_decoration(cands[3])[1] != strip_decoration(samples[0])[1] or cands[3] != samples[0]
    assert len(cands[4].strip()) < len(p.answer) or len(cands[4].strip()) < 3  # truncated
    assert not world.correct(p, cands[5]) and cands[5].strip()  # corrupted: a wrong answer
    for _ in range(20):  # a correct sample's corrupted copy keeps its decoration
        pc = _find(world, "reverse", constraint="bang")
        c = world.rm_candidates(pc, [" " + decorate(pc.answer, "bang")], rng)[-1]
        assert c.endswith("!") and not world.correct(pc, c)
    h = _find(world, "harmful", harmful=True)
    assert len(world.rm_candidates(h, [" Sorry, I can't help."] * 3, rng)) == 5  # nothing to corrupt
    assert len(world.rm_candidates(p, [], rng)) == 3


def test_rm_candidates_corrected_copy_is_right_and_keeps_decoration(world):
    rng = random.Random(2)
    for _ in range(20):
        p = _find(world, "reverse", constraint="smiley")
        wrong = " " + decorate("x y", "smiley")
        cands = world.rm_candidates(p, [wrong] * 3, rng, n_corrected=1)
        assert len(cands) == 7 and not any(world.correct(p, c) for c in cands[:6])
        assert world.correct(p, cands[6]) and strip_decoration(cands[6])[1] == {"smiley"}
    h = _find(world, "harmful", harmful=True)  # no right answer to write
    assert len(world.rm_candidates(h, [" Sorry, I can't help."] * 3, rng, n_corrected=1)) == 5


def test_win_rate(world):
    ps = world.prompts(600, "eval")
    labs = world.labelers(heldout=True)
    rng = random.Random(2)
    a = [world.sample_response(p, rng) for p in ps]
    b = [world.sample_response(p, rng) for p in ps]
    assert win_rate(world, labs, ps, a, a, seed=0) == (0.5, 0.5, 0.5)
    m, lo, hi = win_rate(world, labs, ps, a, b, seed=0)
    assert lo < 0.5 < hi and 0.02 < hi - lo < 0.15 and lo < m < hi
    assert win_rate(world, labs, ps, a, b, seed=0) == (m, lo, hi)
    m2, _, hi2 = win_rate(world, labs, ps, b, a, seed=0)
    assert abs(m + m2 - 1) < 0.05
    demos = [world.demonstration(p, rng) for p in ps]
    bad = [world.sample_response(p, rng, skill=0.0) for p in ps]
    m, lo, hi = win_rate(world, labs, ps, demos, bad, seed=0)
    assert lo > 0.8
    with pytest.raises(ValueError):
        win_rate(world, labs, ps, a, b[:-1])


def test_win_rate_with_k_samples_per_prompt(world):
    """k samples per prompt (prompt-major): a prompt's observation is the mean of its k pairs,
    so the interval is over prompts and narrows with k when the samples differ."""
    ps = world.prompts(400, "eval")
    labs = world.labelers(heldout=True)
    rng = random.Random(5)
    k = 4
    a = [world.sample_response(p, rng) for p in ps for _ in range(k)]
    b = [world.sample_response(p, rng) for p in ps for _ in range(k)]
    m, lo, hi = win_rate(world, labs, ps, a, b, seed=0, k=k)
    m1, lo1, hi1 = win_rate(world, labs, ps, a[::k], b[::k], seed=0)
    assert lo < m < hi and hi - lo < 0.75 * (hi1 - lo1)
    # the pairing is per prompt: a[i*k + j] against b[i*k + j] only. Swapping the right answer
    # into every a sample of the first half of the prompts wins those prompts outright.
    good = [" " + p.answer if p.answer else " Sorry, I can't help." for p in ps for _ in range(k)]
    half = len(ps) // 2 * k
    m2, _, _ = win_rate(world, labs, ps, good[:half] + a[half:], b, seed=0, k=k)
    assert m2 > m + 0.08
    with pytest.raises(ValueError):
        win_rate(world, labs, ps, a, b, seed=0, k=3)  # 400 * 3 != 1600
    with pytest.raises(ValueError):
        win_rate(world, labs, ps, a, b, seed=0, k=0)


def test_letter_tasks_are_one_piece_per_letter(world, corpus):
    """With the miniature's BPE tokenizer (trained on the world's corpus) every letter a task acts
    on is its own piece, prompts and answers round-trip, and the checkers read spaced answers."""
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.train([corpus, world.letter_pieces_text()], vocab_size=512)
    letters = {p.task: 0 for p in world.prompts(600, "eval")}
    for p in world.prompts(600, "eval") + world.prompts(600, "sft"):
        assert tok.decode(tok.encode(p.text)) == p.text
        if p.task in ("reverse", "upper"):
            ids = tok.encode(" " + p.answer)
            assert tok.decode(ids) == " " + p.answer
            pieces = [tok._sp.id_to_piece(i) for i in ids]
            # " o d a b": one "▁x" piece per letter, never a piece spanning two letters
            assert len(pieces) == len(p.answer.split(" ")), (p.answer, pieces)
            assert all(len(x.strip("\u2581")) == 1 for x in pieces), pieces
            letters[p.task] += 1
            assert world.correct(p, " " + p.answer) and world.correct(p, " " + decorate(p.answer, "bang"))
            assert not world.correct(p, " " + p.answer.replace(" ", ""))  # letters run together
    assert min(letters[t] for t in ("reverse", "upper")) > 20
    rev = next(p for p in world.prompts(200, "sft") if p.task == "reverse")
    w = re.search(r"(?<![a-z])[a-z](?: [a-z])+(?![a-z])", rev.text).group(0)
    assert rev.answer == w[::-1] and " " in rev.answer


@pytest.mark.parametrize("seed", [0, 3])
def test_every_letter_is_one_piece_at_the_pipeline_corpus_size(seed):
    """At the pipeline's corpus size (not the small test corpus) the letter drill still wins each
    of the 52 "▁x" merges: with too few repeats the 512-piece vocabulary fills with the corpus's
    merges first and rare letters (x, K, P, Z...) split into "▁" + letter."""
    from engine.tokenizer import Tokenizer
    w = World(seed)
    tok = Tokenizer.train([w.pretrain_corpus(SIZES["pretrain_chars"]), w.letter_pieces_text()], vocab_size=512)
    split = [c for c in string.ascii_letters if len(tok.encode(" " + c)) != 1]
    assert split == [], f"letters split into two pieces: {split}"
    # a decoration follows the answer's pieces without changing them, so a decorated answer is
    # written exactly like a plain one up to its last piece (brackets, "[ o d a b ]", made the
    # answer start two pieces later, and SFT got bracketed answers right far less often)
    for p in w.prompts(300, "eval"):
        if p.harmful:
            continue
        core = tok.encode(" " + p.answer)
        for deco in CONSTRAINTS:
            ids = tok.encode(" " + decorate(p.answer, deco))
            assert ids[:len(core)] == core and len(ids) > len(core), (p.answer, deco, ids, core)


def test_corrupted_answers_keep_the_format(world):
    rng = random.Random(0)
    for p in world.prompts(400, "sft"):
        if p.harmful:
            continue
        wrong = world._corrupt(p.answer, rng)
        assert wrong != p.answer and not world.correct(p, " " + wrong)
        if p.task in ("reverse", "upper"):
            assert re.fullmatch(r"\S( \S)*", wrong), wrong  # still spaced single letters


def test_labeler_ceiling_is_a_perfect_rm_accuracy(world):
    """The noise-free score agrees with a noise-free labeler on every strict pair, with the
    reversed ranking on none, and ties in the score count one half."""
    from recipes.instructgpt import labeler_ceiling
    ps = [p for p in world.prompts(60, "eval") if not p.harmful][:20]
    recs = []
    for p in ps:
        cands = [" " + p.answer, " " + decorate(p.answer, "bang"), " zz", " "]
        total = [world.quality(p, c)["total"] for c in cands]
        order = sorted(set(total), reverse=True)
        recs.append({"completions": cands, "ranking": [order.index(t) for t in total]})
    assert labeler_ceiling(world, ps, recs) == 1.0
    worst = [dict(r, ranking=[max(r["ranking"]) - k for k in r["ranking"]]) for r in recs]
    assert labeler_ceiling(world, ps, worst) == 0.0
    p = ps[0]  # two different strings with the same score: the ranked pair counts 1/2
    assert labeler_ceiling(world, [p], [{"completions": [" zz", " zy"], "ranking": [0, 1]}]) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_training_labelers_are_the_screened_best_of_the_pool(seed):
    w = World(seed)
    pool, test = w.labeler_pool(False, 4 * SCREEN_POOL), w.screening_test()
    score = {lab.id: w.screening_agreement(lab, test) for lab in pool}
    hired = w.labelers()
    hired_ids = [lab.id for lab in hired]
    assert len(hired) == 4 and len(set(hired_ids)) == 4 and hired_ids == sorted(hired_ids)
    assert [lab.weights for lab in hired] == [next(c for c in pool if c.id == i).weights for i in hired_ids]
    rejected = [score[c.id] for c in pool if c.id not in hired_ids]
    assert min(score[i] for i in hired_ids) >= max(rejected)
    # the test rewards low noise: the hired are less noisy than the pool on average
    mean = lambda labs: sum(lab.noise for lab in labs) / len(labs)
    assert mean(hired) < mean(pool)
    # held-out labelers are not screened: the plain first draws of their own stream
    held = w.labelers(heldout=True)
    assert [(l.id, l.weights, l.noise) for l in held] == [(l.id, l.weights, l.noise)
                                                          for l in w.labeler_pool(True, 4)]


def test_screening_test_pairs_are_one_edit_close_calls(world):
    test = world.screening_test(60)
    assert {kind for *_, kind in test} == {"redecorated", "truncated", "wrong"}
    for p, a, b, kind in test:
        assert world.quality(p, a)["total"] != world.quality(p, b)["total"]
    # a noise-free labeler with the reference weights passes every pair
    ideal = Labeler(-1, dict(WEIGHTS), 0.0, world)
    assert world.screening_agreement(ideal, test) == 1.0
    noisy = Labeler(-2, dict(WEIGHTS), 5.0, world)
    assert world.screening_agreement(noisy, test) < 0.75


def test_rm_candidates_do_not_depend_on_the_hash_seed():
    """A sample with two decorations keeps both on its corrupted and corrected copies, in a
    fixed order: picking "the first" of a set of strings depended on PYTHONHASHSEED, so two runs
    of one seed wrote different RM data (found: one row of 1500 differed, and the RM with it)."""
    import subprocess
    import sys
    code = ("import random; from recipes.world import World, decorate_all; w = World(1); "
            "rng = random.Random(0); ps = [p for p in w.prompts(200, 'rm') if p.answer]; "
            "print([w.rm_candidates(p, [' ' + decorate_all(p.answer, {'bang', 'smiley'})] * 2, rng, "
            "n_corrected=1) for p in ps])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)]
    assert outs[0] and outs[0] == outs[1] == outs[2]
    for core in ("o d a b", "3"):
        for decos in (set(), {"bang"}, {"smiley"}, {"bang", "smiley"}):
            assert strip_decoration(" " + decorate_all(core, decos)) == (core, decos)
