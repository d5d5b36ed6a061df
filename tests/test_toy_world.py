"""The toy world: grammar, splits, deterministic renders, flaws that do what they say."""

import math

import numpy as np
import pytest

from ncppo.toy import world


def test_splits_are_disjoint_cover_the_grammar_and_every_word():
    splits = {k: world.prompts(k) for k in ("train", "validation", "eval")}
    assert [len(splits[k]) for k in ("train", "validation", "eval")] == [24, 6, 6]
    assert sorted(sum(splits.values(), [])) == sorted(world.all_prompts())
    assert len(world.all_prompts()) == 4 * 3 * 3
    for k in ("validation", "eval"):
        parsed = [world.parse_prompt(p) for p in splits[k]]
        assert {c for c, _, _ in parsed} == set(world.COLOURS)
        assert {s for _, s, _ in parsed} == set(world.SHAPES)
        assert {b for _, _, b in parsed} == set(world.BACKGROUNDS)


def test_parse_prompt_rejects_other_text_naming_it():
    assert world.parse_prompt("a red circle on a white background") == ("red", "circle", "white")
    with pytest.raises(ValueError, match="a purple circle"):
        world.parse_prompt("a purple circle on a white background")
    with pytest.raises(ValueError, match="unknown flaws"):
        world.sample_spec("a red circle on a white background", 0, ["wobble"])


def test_render_is_deterministic_and_seed_dependent():
    p = "a blue triangle on a gray background"
    a = np.asarray(world.render_prompt(p, 7, ("speckle", "offcentre")))
    b = np.asarray(world.render_prompt(p, 7, ("speckle", "offcentre")))
    c = np.asarray(world.render_prompt(p, 8, ("speckle", "offcentre")))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flawless_render_pixels():
    img = np.asarray(world.render(world.RenderSpec("red", "square", "white")))
    # square of half-extent 8 centred at 16: pixels 8..23 are fully inside, 0..6 fully outside
    assert tuple(img[16, 16]) == world.COLOURS["red"]
    assert tuple(img[8, 8]) == world.COLOURS["red"] and tuple(img[23, 23]) == world.COLOURS["red"]
    assert tuple(img[0, 0]) == world.BACKGROUNDS["white"] and tuple(img[16, 6]) == world.BACKGROUNDS["white"]
    assert (np.all(img == world.COLOURS["red"], axis=2)).sum() == 16 * 16


def test_each_flaw_moves_its_property_out_of_the_flawless_range():
    p = "a green circle on a black background"
    for seed in range(20):
        ok = world.sample_spec(p, seed)
        assert abs(ok.cx - 16) <= 1 and abs(ok.cy - 16) <= 1 and abs(ok.size - 8) <= 0.75
        assert (ok.colour, ok.shape, ok.background, ok.blur, ok.speckle) == ("green", "circle", "black", 0.0, 0.0)
        assert world.sample_spec(p, seed, ["colour"]).colour != "green"
        assert world.sample_spec(p, seed, ["shape"]).shape != "circle"
        assert world.sample_spec(p, seed, ["background"]).background != "black"
        assert abs(world.sample_spec(p, seed, ["size"]).size - 8) >= 3
        off = world.sample_spec(p, seed, ["offcentre"])
        assert math.hypot(off.cx - 16, off.cy - 16) >= 5
        assert world.sample_spec(p, seed, ["blur"]).blur >= 1.0
        assert world.sample_spec(p, seed, ["speckle"]).speckle >= 0.06
        # a flaw changes only its own property (fixed draw order)
        assert world.sample_spec(p, seed, ["blur"]).cx == ok.cx


def test_random_flaw_rates():
    rng = np.random.default_rng(0)
    draws = [world.random_flaws(rng) for _ in range(4000)]
    for flaw, rate in world.PRETRAIN_FLAW_RATES.items():
        freq = np.mean([flaw in d for d in draws])
        assert abs(freq - rate) < 0.03, (flaw, freq, rate)
