"""torchdojo.augment: the transform contract (shapes, dtypes, labels, seeds, no global RNG, no in-place
writes), and each transform's intended effect measured on data built to show it."""
from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch

from torchdojo.augment import (AUGMENTS, Affine, ColumnGaussian, Compose, CutMix, Cutout, HFlip, Jitter,
                               Mixup, Noise, RandAugment, Rotate, Scale, Shift, SwapNoise, TimeWarp,
                               TokenDropout, TokenMask, TokenReplace, TokenSwap, Translate, VFlip, identity,
                               sample_beta, sample_gamma)
from torchdojo.augment.image import rotation, warp
from torchdojo.data.bundle import Split
from torchdojo.data.loader import TensorLoader
from torchdojo.registry import Entry


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(kind: str, n: int = 32, seed: int = 1) -> dict:
    g = gen(seed)
    if kind == "image":
        x = torch.rand(n, 2, 8, 8, generator=g)
    elif kind == "sequence":
        x = torch.randn(n, 1, 40, generator=g)
    elif kind == "table":
        x = torch.randn(n, 6, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0, 5.0, 2.0])
    else:                                                    # text: ids 5..49, specials 0..4
        x = torch.randint(5, 50, (n, 12), generator=g)
        x[:, 0] = 1                                          # [CLS]
        x[:, 8] = 2                                          # [SEP]
        x[:, 9:] = 0                                         # padding
    return {"x": x, "y": torch.randint(0, 10, (n,), generator=g)}


SPECIALS = [0, 1, 2, 3]                                      # pad, cls, sep, mask

# name -> constructor keyword arguments (injected ones included) for the contract tests
KWARGS = {
    "mixup": {"num_classes": 10}, "cutmix": {"num_classes": 10},
    "token_dropout": {"pad_id": 0, "special_ids": SPECIALS},
    "token_replace": {"vocab_size": 50, "special_ids": SPECIALS},
    "token_swap": {"special_ids": SPECIALS},
    "token_mask": {"mask_id": 3, "special_ids": SPECIALS},
}
CASES = [(name, kind) for name, cls in AUGMENTS.items()
         for kind in (["image", "sequence", "table"] if cls.kind == "any" else [cls.kind])]


def make(name: str, **options):
    return AUGMENTS[name](**{**KWARGS.get(name, {}), **options})


# ------------------------------------------------------------------------------------- the contract

def test_catalog_and_recipe_schema():
    assert set(AUGMENTS) == {"hflip", "vflip", "translate", "rotate", "affine", "cutout", "noise", "randaugment",
                             "mixup", "cutmix", "shift", "scale", "jitter", "time_warp", "token_dropout",
                             "token_replace", "token_swap", "token_mask", "swap_noise", "gaussian"}
    for name, cls in AUGMENTS.items():
        assert cls.kind in ("image", "sequence", "text", "table", "any"), name
        assert cls.mixes_labels is (name in ("mixup", "cutmix")), name
        params = inspect.signature(cls).parameters.values()
        assert "p" in [p.name for p in params], name
        for p in params:
            assert p.default is not inspect.Parameter.empty, (name, p.name)       # plain options with defaults
            if p.kind is p.KEYWORD_ONLY:
                assert p.name in ("num_classes", "special_ids"), (name, p.name)
        typing.get_type_hints(cls.__init__)                  # hints resolve (the registry needs them)
        injected = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        schema = Entry(name, cls, "", injected=injected).schema()
        assert "p" in schema.model_fields and not set(injected) & set(schema.model_fields)
        schema.model_validate({})                            # every option has a default
    assert Entry("shift", Shift, "").schema().model_validate({"mode": "zero"}).mode == "zero"


@pytest.mark.parametrize("name,kind", CASES)
def test_contract(name, kind):
    """Shapes, dtypes and labels kept (soft targets for mixers), same seed -> same output, other seed ->
    other output, inputs untouched, extra keys kept, global RNG untouched."""
    t = make(name, p=1.0)
    batch = _batch(kind)
    batch["extra"] = torch.arange(len(batch["x"]))
    before = {k: v.clone() for k, v in batch.items()}
    rng = torch.get_rng_state()
    out = t(batch, gen(0))
    assert torch.equal(torch.get_rng_state(), rng), "used the global RNG"
    for k in before:
        assert torch.equal(batch[k], before[k]), f"modified the input {k!r}"
    assert out is not batch and torch.equal(out["extra"], batch["extra"])
    assert out["x"].shape == batch["x"].shape and out["x"].dtype == batch["x"].dtype
    if t.mixes_labels:
        y = out["y"]
        assert y.shape == (len(batch["x"]), 10) and y.is_floating_point()
        torch.testing.assert_close(y.sum(1), torch.ones(len(y)))
    else:
        assert torch.equal(out["y"], batch["y"])
    assert not torch.equal(out["x"], batch["x"]), "p=1 changed nothing"
    again = t(batch, gen(0))
    assert all(torch.equal(out[k], again[k]) for k in out), "not reproducible under a seed"
    varied = make(name)                                      # default p: flips and token edits at p = 1 draw nothing
    assert not torch.equal(varied(batch, gen(0))["x"], varied(batch, gen(1))["x"]), "seed made no difference"


@pytest.mark.parametrize("name,kind", CASES)
def test_p_zero_is_identity(name, kind):
    batch = _batch(kind)
    out = make(name, p=0.0)(batch, gen(0))
    assert torch.equal(out["x"], batch["x"])
    if name in ("mixup", "cutmix"):
        assert torch.equal(out["y"], torch.nn.functional.one_hot(batch["y"], 10).float())
        assert bool((out["mix_lambda"] == 1).all())
    else:
        assert torch.equal(out["y"], batch["y"])


# name, options, the fraction of samples the op itself changes (a zero shift changes nothing)
PER_SAMPLE = [("hflip", {}, 1.0), ("vflip", {}, 1.0), ("translate", {"max_pixels": 3}, 48 / 49),
              ("rotate", {}, 1.0), ("affine", {}, 1.0), ("cutout", {}, 1.0),
              ("randaugment", {"n": 3}, 1 - 1 / 343), ("noise", {}, 1.0), ("shift", {"max_steps": 5}, 10 / 11),
              ("scale", {}, 1.0), ("jitter", {}, 1.0), ("time_warp", {}, 1.0), ("gaussian", {}, 1.0),
              ("mixup", {"per_sample": True, "alpha": 1.0}, 1.0), ("cutmix", {"per_sample": True}, 1.0)]


@pytest.mark.parametrize("name,options,full", PER_SAMPLE)
def test_p_is_a_per_sample_probability(name, options, full):
    """p = 1 changes every sample (that the drawn op changes at all); p = 0.3 about 30% of them."""
    kind = "image" if AUGMENTS[name].kind == "any" else AUGMENTS[name].kind
    batch = _batch(kind, n=2000)
    changed = lambda out: (out["x"] != batch["x"]).flatten(1).any(1).float().mean().item()  # noqa: E731
    assert changed(make(name, p=1.0, **options)(batch, gen(0))) > full - 0.015
    assert abs(changed(make(name, p=0.3, **options)(batch, gen(0))) - 0.3 * full) < 0.04


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["hflip", "translate", "rotate", "affine", "cutout", "randaugment", "mixup",
                                  "cutmix", "noise"])
def test_other_float_dtypes_kept(name, dtype):
    batch = _batch("image")
    batch["x"] = batch["x"].to(dtype)
    out = make(name)(batch, gen(0))
    assert out["x"].dtype == dtype and out["x"].shape == batch["x"].shape
    assert bool(torch.isfinite(out["x"].float()).all())


def test_bad_options_and_inputs_are_clear_value_errors():
    for build, text in [(lambda: HFlip(p=1.5), "p must be in"), (lambda: Rotate(max_degrees=-1), "max_degrees"),
                        (lambda: Affine(min_scale=1.2, max_scale=1.1), "min_scale"),
                        (lambda: Cutout(fraction=0), "fraction"), (lambda: Translate(max_pixels=1.5), "max_pixels"),
                        (lambda: Shift(mode="reflect"), "mode"), (lambda: TimeWarp(max_warp=1.0), "max_warp"),
                        (lambda: Mixup(alpha=0), "alpha"), (lambda: RandAugment(magnitude=11), "magnitude"),
                        (lambda: TokenReplace(), "vocab_size"), (lambda: TokenMask(), "mask_id"),
                        (lambda: Noise(std=float("nan")), "std")]:
        with pytest.raises(ValueError, match=text):
            build()
    with pytest.raises(ValueError, match=r"rotate expects .*\(N, C, H, W\)"):
        Rotate()(_batch("sequence"), gen())
    with pytest.raises(ValueError, match="token ids"):
        TokenMask(mask_id=3)(_batch("image"), gen())
    with pytest.raises(ValueError, match="floating-point"):
        Mixup(num_classes=10)(_batch("text"), gen())
    with pytest.raises(ValueError, match="num_classes"):
        Mixup()(_batch("image"), gen())


# ------------------------------------------------------------------------------------------ images

def test_flips():
    batch = _batch("image")
    once = HFlip(p=1.0)(batch, gen(0))
    assert torch.equal(once["x"], batch["x"].flip(-1))
    assert torch.equal(HFlip(p=1.0)(once, gen(1))["x"], batch["x"])
    assert torch.equal(VFlip(p=1.0)(batch, gen(0))["x"], batch["x"].flip(-2))
    half = HFlip(p=0.5)(_batch("image", n=4000), gen(0))["x"]
    flipped = (half != _batch("image", n=4000)["x"]).flatten(1).any(1).float().mean().item()
    assert abs(flipped - 0.5) < 0.03


def test_translate_moves_a_bright_pixel_by_at_most_max_pixels():
    n, m = 600, 3
    x = torch.zeros(n, 1, 16, 16)
    x[:, 0, 7, 8] = 1.0
    out = Translate(max_pixels=m)({"x": x, "y": torch.zeros(n, dtype=torch.long)}, gen(0))["x"]
    assert bool(((out == 0) | (out == 1)).all()) and bool((out.sum((1, 2, 3)) == 1).all())   # whole pixels
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 16 - 7, pos % 16 - 8
    assert int(dy.abs().max()) == m and int(dx.abs().max()) == m
    assert len(set(zip(dy.tolist(), dx.tolist()))) == (2 * m + 1) ** 2                     # every shift occurs
    edge = torch.zeros(n, 1, 8, 8)
    edge[:, 0, 0, 0] = 1.0                                   # shifted up or left: falls out, zero fill
    gone = Translate(max_pixels=2)({"x": edge, "y": torch.zeros(n)}, gen(0))["x"].sum((1, 2, 3))
    assert 0.5 < (gone == 0).float().mean().item() < 0.8     # P(dy < 0 or dx < 0) = 1 - (3/5)^2 = 0.64


def test_warp_geometry_matches_rot90_and_pixel_shift():
    x = torch.rand(3, 2, 8, 8)
    quarter = warp(x, rotation(torch.full((3,), math.pi / 2, dtype=torch.float64)), torch.zeros(3, 2))
    torch.testing.assert_close(quarter, torch.rot90(x, -1, (2, 3)))
    wide = torch.rand(1, 1, 6, 10)                           # non-square: 180 degrees is both flips
    half = warp(wide, rotation(torch.full((1,), math.pi, dtype=torch.float64)), torch.zeros(1, 2))
    torch.testing.assert_close(half, wide.flip(-1).flip(-2))
    tall = torch.zeros(1, 1, 8, 12)                          # non-square, 90 degrees: a dot at (x, y) =
    tall[0, 0, 2, 5] = 1.0                                   # (-0.5, -1.5) from the centre goes to (1.5, -0.5)
    turned = warp(tall, rotation(torch.full((1,), math.pi / 2, dtype=torch.float64)), torch.zeros(1, 2))
    assert (turned[0, 0] > 1e-5).nonzero().tolist() == [[3, 7]] and abs(float(turned.max()) - 1) < 1e-5
    dot = torch.zeros(1, 1, 8, 6)
    dot[0, 0, 2, 3] = 1.0
    moved = warp(dot, torch.eye(2)[None], torch.tensor([[1.0, 2.0]]))                    # x + 1, y + 2
    assert moved[0, 0].nonzero().tolist() == [[4, 4]]


def test_rotate_small_angle_keeps_most_mass():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 8.0)
    x = blob.expand(200, 1, 16, 16)
    out = Rotate(max_degrees=10)({"x": x, "y": torch.zeros(200)}, gen(0))["x"]
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.02, atol=0)
    assert float((out - x).abs().max()) < 0.05               # a round blob barely changes
    bar = torch.zeros(200, 1, 16, 16)
    bar[:, 0, 7:9, 2:14] = 1.0
    turned = Rotate(max_degrees=10)({"x": bar, "y": torch.zeros(200)}, gen(0))["x"]
    assert float((turned - bar).abs().sum((1, 2, 3)).mean()) > 1.0   # a bar visibly turns


def test_affine_identity_and_scale():
    batch = _batch("image")
    same = Affine(max_degrees=0, max_translate=0, min_scale=1, max_scale=1, max_shear=0)(batch, gen(0))
    torch.testing.assert_close(same["x"], batch["x"])
    ones = {"x": torch.ones(4, 1, 32, 32), "y": torch.zeros(4)}
    small = Affine(max_degrees=0, max_translate=0, min_scale=0.5, max_scale=0.5, max_shear=0)(ones, gen(0))
    torch.testing.assert_close(small["x"].mean((1, 2, 3)), torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_cutout_zeros_the_expected_area():
    n, h = 3000, 12
    x = torch.ones(n, 1, h, h)
    out = Cutout(fraction=0.5)({"x": x, "y": torch.zeros(n)}, gen(0))["x"]
    holes = out[:, 0] == 0
    rows, cols = holes.any(2), holes.any(1)
    # one rectangle per image, at most 6 x 6 pixels (clipped at the border, as in the paper)
    assert torch.equal(holes, rows.unsqueeze(2) & cols.unsqueeze(1))
    assert int(rows.sum(1).max()) == 6 and int(cols.sum(1).max()) == 6 and int(rows.sum(1).min()) >= 3
    side = sum(min(c - 3 + 6, h) - max(c - 3, 0) for c in range(h)) / h   # mean clipped side, centre uniform
    assert abs(holes.float().sum((1, 2)).mean().item() - side ** 2) < 0.5
    fixed = Cutout(size=3, n_holes=2, fill=-1.0)({"x": x[:200], "y": torch.zeros(200)}, gen(0))["x"]
    assert set(fixed.unique().tolist()) == {-1.0, 1.0} and int((fixed == -1).sum((1, 2, 3)).max()) <= 18


def test_randaugment_gives_each_sample_its_own_ops():
    batch = _batch("image", n=1400)
    out = RandAugment(n=1, magnitude=10)(batch, gen(0))["x"]
    unchanged = (out == batch["x"]).flatten(1).all(1).float().mean().item()
    assert abs(unchanged - 1 / 7) < 0.035                    # the identity op, one sample in seven
    zero = RandAugment(n=2, magnitude=0)(batch, gen(0))["x"]
    torch.testing.assert_close(zero, batch["x"])             # magnitude 0: every op is (almost) identity


# -------------------------------------------------------------------------------------- mixing

def test_beta_and_gamma_samplers_match_their_moments():
    g = gen(0)
    for a, b in [(0.2, 0.2), (1.0, 1.0), (2.0, 5.0), (0.5, 3.0), (20.0, 20.0)]:
        s = sample_beta(a, b, (200_000,), g)
        mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
        assert bool(((s >= 0) & (s <= 1)).all())
        assert abs(s.mean().item() - mean) < 0.005, (a, b)
        assert abs(s.var().item() - var) < 0.03 * var + 1e-4, (a, b)
    for a in (0.3, 1.0, 4.5):
        s = sample_gamma(a, (200_000,), g)
        assert abs(s.mean().item() - a) < 0.02 * a and abs(s.var().item() - a) < 0.05 * a, a
    assert torch.equal(sample_beta(0.4, 0.4, (50,), gen(3)), sample_beta(0.4, 0.4, (50,), gen(3)))
    assert bool(torch.isfinite(sample_beta(0.01, 0.01, (10_000,), g)).all())   # tiny alpha: no 0/0


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_blends_inputs_and_targets_by_the_recorded_lambda(per_sample):
    batch = _batch("image", n=64)
    out = Mixup(alpha=0.4, per_sample=per_sample, num_classes=10)(batch, gen(0))
    lam, j = out["mix_lambda"], out["mix_index"]
    assert sorted(j.tolist()) == list(range(64))
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out["x"], w * batch["x"] + (1 - w) * batch["x"][j])
    onehot = torch.nn.functional.one_hot(batch["y"], 10).float()
    torch.testing.assert_close(out["y"], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[j])
    assert (lam.unique().numel() > 1) is per_sample
    again = Mixup(alpha=0.4, num_classes=10)(out, gen(1))    # soft targets are mixed as they are
    torch.testing.assert_close(again["y"], again["mix_lambda"][:, None] * out["y"]
                               + (1 - again["mix_lambda"][:, None]) * out["y"][again["mix_index"]])
    torch.testing.assert_close(again["y"].sum(1), torch.ones(64))
    reg = Mixup()({"x": batch["x"], "y": torch.randn(64)}, gen(0))                  # regression targets
    assert reg["y"].shape == (64,)
    rate = [Mixup(p=0.25, num_classes=10)(batch, gen(s))["mix_lambda"][0].item() != 1 for s in range(400)]
    assert abs(sum(rate) / 400 - 0.25) < 0.07                # p per batch


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_label_weight_is_the_kept_area(per_sample):
    n, h, w = 256, 10, 12
    x = torch.arange(1.0, n + 1).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()   # image i is all i + 1
    y = torch.arange(n) % 10
    out = CutMix(alpha=1.0, per_sample=per_sample, num_classes=10)({"x": x, "y": y}, gen(0))
    lam, j = out["mix_lambda"], out["mix_index"]
    own = (out["x"] == x).all(1).float().mean((1, 2))        # fraction of pixels still the image's own
    moved = j != torch.arange(n)
    torch.testing.assert_close(own[moved], lam[moved])
    pasted = out["x"][:, 0] != x[:, 0]
    assert torch.equal(pasted, pasted.any(2, keepdim=True) & pasted.any(1, keepdim=True))   # one box
    assert bool((out["x"][pasted.unsqueeze(1).expand_as(x)] ==
                 x[j][pasted.unsqueeze(1).expand_as(x)]).all())                      # from the partner
    onehot = torch.nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(out["y"], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[j])
    assert 0.3 < lam.mean().item() < 0.8                     # Beta(1, 1) area, shrunk by clipping


# ------------------------------------------------------------------------------------ sequences

def test_shift():
    batch = _batch("sequence", n=300)
    x = batch["x"]
    out = Shift(max_steps=5)(batch, gen(0))["x"]
    torch.testing.assert_close(out.sort(-1).values, x.sort(-1).values, rtol=0, atol=0)   # same multiset
    shifts = [next(s for s in range(-5, 6) if torch.equal(o, xi.roll(s, -1))) for o, xi in zip(out, x)]
    assert set(shifts) == set(range(-5, 6))
    zero = Shift(max_steps=5, mode="zero")(batch, gen(0))["x"]
    for o, xi, s in zip(zero, x, shifts):                    # same draws: the same shift, zero filled
        expect = xi.roll(s, -1)
        if s > 0:
            expect[:, :s] = 0
        elif s < 0:
            expect[:, s:] = 0
        assert torch.equal(o, expect)


def test_scale_and_jitter():
    batch = _batch("sequence", n=500)
    x = batch["x"].abs() + 0.5
    ratio = Scale(min_scale=0.7, max_scale=1.3)({"x": x, "y": batch["y"]}, gen(0))["x"] / x
    assert bool((ratio.amax(-1) - ratio.amin(-1) < 1e-5).all())                   # one factor per row
    assert 0.7 <= ratio.min().item() < 0.72 and 1.28 < ratio.max().item() <= 1.3
    x64 = batch["x"].double()
    noise = Jitter(std=0.05)({"x": x64, "y": batch["y"]}, gen(0))["x"] - x64
    assert abs(noise.std().item() - 0.05) < 0.001 and abs(noise.mean().item()) < 0.001


def test_time_warp_is_a_smooth_monotone_resampling():
    n, length = 400, 40
    ramp = torch.linspace(0, 1, length).expand(n, 1, length)
    out = TimeWarp(max_warp=0.5)({"x": ramp, "y": torch.zeros(n)}, gen(0))["x"]
    steps = out.diff(dim=-1)
    assert bool((steps > 0).all())                           # monotone map of time
    torch.testing.assert_close(out[..., [0, -1]], ramp[..., [0, -1]])           # end points stay
    assert float((out - ramp).abs().amax()) > 0.03           # and the middle moves
    slope = steps * (length - 1)                             # the speed stays within 1 +- max_warp (ish)
    assert 0.3 < slope.min().item() and slope.max().item() < 2.5
    batch = _batch("sequence", n=100)
    warped = TimeWarp(max_warp=0.3)(batch, gen(0))["x"]
    lo, hi = batch["x"].amin(-1, keepdim=True), batch["x"].amax(-1, keepdim=True)
    assert bool(((warped >= lo - 1e-6) & (warped <= hi + 1e-6)).all())          # interpolation only


# ----------------------------------------------------------------------------------------- text

def _text(n: int = 2000) -> dict:
    return _batch("text", n=n)


def test_token_dropout_deletes_ordinary_tokens_only():
    batch = _text()
    x = batch["x"]
    out = TokenDropout(p=0.2, special_ids=SPECIALS)(batch, gen(0))["x"]
    assert out.shape == x.shape and out.dtype == torch.long
    kept = 0
    for o, xi in zip(out[:300], x[:300]):
        o_ids, x_ids = [t for t in o.tolist() if t != 0], [t for t in xi.tolist() if t != 0]
        assert o_ids[0] == 1 and o_ids[-1] == 2                # [CLS] and [SEP] kept, in place in order
        it = iter(x_ids)
        assert all(t in it for t in o_ids)                      # a subsequence of the input
        assert o.tolist()[len(o_ids):] == [0] * (len(o) - len(o_ids))   # padded at the end
        kept += len(o_ids) - 2
    assert abs(1 - kept / (300 * 7) - 0.2) < 0.03               # 7 ordinary tokens per row


def test_token_replace_and_mask_never_touch_or_produce_specials():
    batch = _text()
    x = batch["x"]
    special = torch.isin(x, torch.tensor(SPECIALS))
    out = TokenReplace(p=0.3, vocab_size=50, special_ids=SPECIALS)(batch, gen(0))["x"]
    assert torch.equal(out[special], x[special]) and not bool(torch.isin(out[~special], torch.tensor(SPECIALS)).any())
    rate = (out != x)[~special].float().mean().item()
    assert abs(rate - 0.3 * (1 - 1 / 46)) < 0.01                # 46 allowed ids; a pick may equal the old id
    masked = TokenMask(p=0.3, mask_id=3, special_ids=SPECIALS)(batch, gen(0))["x"]
    assert torch.equal(masked[special], x[special])
    hit = masked != x
    assert bool((masked[hit] == 3).all()) and abs(hit[~special].float().mean().item() - 0.3) < 0.01


def test_token_swap_swaps_neighbours_only():
    batch = _text()
    x = batch["x"]
    out = TokenSwap(p=0.2, special_ids=SPECIALS)(batch, gen(0))["x"]
    special = torch.isin(x, torch.tensor(SPECIALS))
    assert torch.equal(out[special], x[special])
    assert torch.equal(out.sort(1).values, x.sort(1).values)   # same tokens per row
    moved = out != x
    left, right = torch.nn.functional.pad(x, (1, 0))[:, :-1], torch.nn.functional.pad(x, (0, 1))[:, 1:]
    assert bool(((out == left) | (out == right))[moved].all())
    assert 0.1 < moved[~special].float().mean().item() < 0.4


# ---------------------------------------------------------------------------------------- tables

def test_swap_noise_rate_and_source():
    n, f, p = 4000, 10, 0.15
    x = torch.randn(n, f, generator=gen(5), dtype=torch.float64)               # continuous: no ties
    out = SwapNoise(p=p)({"x": x, "y": torch.zeros(n)}, gen(0))["x"]
    changed = out != x
    assert abs(changed.float().mean().item() - p) < 0.01
    for col in range(3):                                        # a swapped value comes from its column
        assert bool(torch.isin(out[changed[:, col], col], x[:, col]).all())
    assert torch.equal(SwapNoise(p=1.0)({"x": x[:1], "y": torch.zeros(1)}, gen(0))["x"], x[:1])


def test_noise_and_column_gaussian_measure_their_std():
    n = 20_000
    x = torch.randn(n, 3, generator=gen(5), dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    delta = ColumnGaussian(std=0.1)({"x": x, "y": torch.zeros(n)}, gen(0))["x"] - x
    torch.testing.assert_close(delta.std(0) / x.std(0), torch.full((3,), 0.1, dtype=torch.float64), rtol=0.03, atol=0)
    plain = Noise(std=0.2)({"x": x, "y": torch.zeros(n)}, gen(0))["x"] - x
    assert abs(plain.std().item() - 0.2) < 0.004


# ---------------------------------------------------------------------------------------- compose

def test_compose_identity_and_loader():
    batch = _batch("image")
    steps = [HFlip(), Translate(max_pixels=1), Cutout(fraction=0.25), Mixup(num_classes=10)]
    g1, g2 = gen(7), gen(7)
    out = Compose(steps)(batch, g1)
    manual = batch
    for t in steps:
        manual = t(manual, g2)
    assert all(torch.equal(out[k], manual[k]) for k in out)
    assert Compose(steps).mixes_labels and not Compose(steps[:3]).mixes_labels
    assert identity(batch, gen()) == batch and identity(batch, gen()) is not batch
    empty = Compose([])(batch, gen())
    assert empty == batch and empty is not batch

    split = Split(torch.rand(100, 1, 8, 8), torch.randint(0, 10, (100,)))
    pipeline = Compose([Rotate(), Cutout(), CutMix(num_classes=10)])
    a = [b["x"] for b in TensorLoader(split, 32, shuffle=True, seed=3, transform=pipeline).epoch(1)]
    b = [b["x"] for b in TensorLoader(split, 32, shuffle=True, seed=3, transform=pipeline).epoch(1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == 4
