"""Batched data augmentation on tensors, deterministic under a torch.Generator, usable in any loop.

Every transform is `transform(batch, generator) -> batch` on a dict {"x": inputs (N, ...), "y":
targets}: it returns a new dict (the input tensors are never written to), keeps x's shape and dtype,
keeps y unless it mixes labels, and draws all of its randomness from `generator`, so a seeded
generator (`TensorLoader` seeds one from (seed, epoch, batch)) reproduces a batch exactly.

Each class has `kind` ("image", "sequence", "text", "table" or "any": the data it fits) and
`mixes_labels` (True for mixup and cutmix, which return soft targets). `AUGMENTS` maps recipe names
to classes; a class's keyword arguments are its recipe options, except the keyword-only ones
(`num_classes`, `special_ids`) that the trainer supplies.

    g = torch.Generator().manual_seed(0)
    batch = Compose([HFlip(), Translate(max_pixels=1), Cutout(fraction=0.25)])(batch, g)

Modules: `image` (flips, translate, rotate, affine, cutout, RandAugment), `mix` (mixup, cutmix),
`sequence` (shift, scale, jitter, time warp), `text` (token dropout, replace, swap, mask), `table`
(swap noise, column-scaled Gaussian noise), `generic` (Gaussian noise), `sampling` (Gamma and Beta
samples from a generator).
"""
from .base import Augment, Compose, identity
from .generic import Noise
from .image import Affine, Cutout, HFlip, RandAugment, Rotate, Translate, VFlip
from .mix import CutMix, Mixup
from .sampling import sample_beta, sample_gamma
from .sequence import Jitter, Scale, Shift, TimeWarp
from .table import ColumnGaussian, SwapNoise
from .text import TokenDropout, TokenMask, TokenReplace, TokenSwap

# Recipe name -> class (a phase's `augment:` list names these).
AUGMENTS: dict[str, type] = {
    # images (N, C, H, W)
    "hflip": HFlip, "vflip": VFlip, "translate": Translate, "rotate": Rotate, "affine": Affine,
    "cutout": Cutout, "randaugment": RandAugment, "mixup": Mixup, "cutmix": CutMix,
    # any float input
    "noise": Noise,
    # sequences (N, C, L)
    "shift": Shift, "scale": Scale, "jitter": Jitter, "time_warp": TimeWarp,
    # token ids (N, L)
    "token_dropout": TokenDropout, "token_replace": TokenReplace, "token_swap": TokenSwap,
    "token_mask": TokenMask,
    # tables (N, F)
    "swap_noise": SwapNoise, "gaussian": ColumnGaussian,
}

__all__ = ["AUGMENTS", "Augment", "Compose", "identity", "sample_beta", "sample_gamma",
           *(cls.__name__ for cls in AUGMENTS.values())]
