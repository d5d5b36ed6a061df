"""The toy judge: hand-computed cases, flawless above every flaw, the scorer interface."""

import numpy as np
import pytest
import torch
from PIL import Image

from ncppo.toy import world
from ncppo.toy.judge import WEIGHTS, ToyJudge, judge_score, judge_terms


def test_empty_canvas_of_the_right_background_scores_background_plus_clean():
    img = Image.new("RGB", (32, 32), world.BACKGROUNDS["white"])
    terms = judge_terms(img, "a red circle on a white background")
    assert terms["background"] == 1.0 and terms["clean"] == 1.0
    assert terms["colour"] == terms["shape"] == terms["centre"] == terms["size"] == terms["sharp"] == 0.0
    assert judge_score(img, "a red circle on a white background") == 2.0


def test_flawless_square_hits_every_term():
    img = world.render(world.RenderSpec("blue", "square", "black"))
    t = judge_terms(img, "a blue square on a black background")
    assert t["colour"] == pytest.approx(1.0) and t["background"] == pytest.approx(1.0)
    # the 4 corner pixels of the 16x16 square differ from their 3x3 median: counted as speckle
    # and cleaned away, so the mask fills 252 of its 256-pixel box
    assert t["speckle_frac"] == 4 / 1024 and t["clean"] == pytest.approx(np.exp(-0.5 * (4 / 1024 / 0.015) ** 2))
    assert t["offset"] == 0.0 and t["half_extent"] == 8.0 and t["fill"] == 252 / 256 and t["top_share"] == 0.5
    assert t["shape"] > 0.98 and t["sharp"] == 1.0
    assert judge_score(img, "a blue square on a black background") > 9.9 - 0.05
    assert sum(WEIGHTS.values()) == 10.0


@pytest.mark.parametrize("flaw", world.FLAWS)
def test_flawless_outranks_each_flaw_on_every_prompt(flaw):
    for prompt in world.all_prompts():
        for seed in range(3):
            good = judge_score(world.render_prompt(prompt, seed), prompt)
            bad = judge_score(world.render_prompt(prompt, seed, [flaw]), prompt)
            assert good > bad + 0.3, (prompt, seed, flaw, good, bad)


def test_terms_track_their_flaw():
    p = "a yellow triangle on a gray background"
    ok, blur, spk = (judge_terms(world.render_prompt(p, 1, f), p) for f in ((), ("blur",), ("speckle",)))
    assert ok["sharp"] == 1.0 and blur["sharp"] < 0.5
    assert ok["speckle_frac"] < 0.01 and spk["speckle_frac"] > 0.03
    wrong = judge_terms(world.render_prompt(p, 1, ("colour",)), p)
    assert ok["colour"] > 0.95 and wrong["colour"] < 0.05


def test_scorer_interface():
    from ncppo.evaluate.scorers import get_scorer

    judge = get_scorer("toy-judge")
    assert isinstance(judge, ToyJudge) and judge.name == "toy-judge"
    prompts = ["a red circle on a white background", "a green square on a black background"]
    images = [world.render_prompt(p, 0) for p in prompts]
    scores = judge.score(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert torch.allclose(scores, torch.tensor([judge_score(i, p) for i, p in zip(images, prompts)]))
    # a 64x64 image is judged at 32x32
    big = images[0].resize((64, 64), Image.NEAREST)
    assert abs(float(judge.score([big], prompts[:1])[0]) - float(scores[0])) < 0.5
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        judge.score(images, prompts[:1])
