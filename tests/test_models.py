"""Registered models: build from the registry with defaults, output shapes, input checks, config options
(exact parameter-count formulas) and a measured ability to fit a tiny separable problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdojo.models import MODELS as MODEL_CLASSES
from torchdojo.registry import MODELS


def build(name, input_shape, num_outputs=3, **options):
    return MODELS.build({"name": name, **options}, "model", input_shape=tuple(input_shape),
                        num_outputs=num_outputs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# A suitable input shape for each model (image, sequence, table).
SHAPES = {"mlp": (7,), "cnn": (1, 8, 8), "cnn1d": (1, 40), "gru": (2, 12), "moe_mlp": (7,)}


def test_every_builtin_model_is_registered():
    assert set(MODEL_CLASSES) <= set(MODELS.names())
    assert set(SHAPES) == set(MODEL_CLASSES), "a new model needs a shape in SHAPES"


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("num_outputs", [1, 5])
def test_builds_with_defaults_and_gives_b_by_k(name, num_outputs):
    torch.manual_seed(0)
    model = build(name, SHAPES[name], num_outputs)
    assert isinstance(model, MODEL_CLASSES[name])
    model.eval()
    out = model(torch.randn(6, *SHAPES[name]))
    assert out.shape == (6, num_outputs) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()                      # every parameter takes part in the output
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_outputs_do_not_mix_samples(name):
    torch.manual_seed(0)
    model = build(name, SHAPES[name]).eval()
    x = torch.randn(5, *SHAPES[name])
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, bad_shape, expected", [
    ("cnn", (64,), r"\(C, H, W\)"),
    ("cnn", (1, 40), r"\(C, H, W\)"),
    ("cnn1d", (1, 8, 8), r"\(C, L\)"),
    ("cnn1d", (40,), r"\(C, L\)"),
    ("gru", (1, 8, 8), r"\(C, L\)"),
])
def test_wrong_input_rank_is_a_clear_error(name, bad_shape, expected):
    from torchdojo.errors import ConfigError
    with pytest.raises(ConfigError, match=expected) as info:   # the model's ValueError, with its key path
        build(name, bad_shape)
    assert name in str(info.value) and str(tuple(bad_shape)) in str(info.value)


def test_wrong_input_rank_through_the_trainer_is_a_config_error():
    from torchdojo.errors import ConfigError
    from torchdojo.recipe import load_recipe
    from torchdojo.trainer import Trainer

    r = load_recipe({"name": "x", "data": {"name": "iris"}, "model": {"name": "cnn"},
                     "phases": [{"steps": 1, "optimizer": {"name": "adam"}}]})
    with pytest.raises(ConfigError) as info:
        Trainer(r, None, quiet=True)
    assert info.value.path == "model" and "(C, H, W)" in str(info.value)


# -- options take effect (exact formulas) ----------------------------------------------------------

def linear_params(i, o):
    return i * o + o


@pytest.mark.parametrize("hidden", [[], [16], [32, 8], [5, 6, 7]])
def test_mlp_parameter_count_formula(hidden):
    d, k = 7, 3
    model = build("mlp", (d,), k, hidden=hidden)
    widths = [d, *hidden, k]
    assert n_params(model) == sum(linear_params(a, b) for a, b in zip(widths, widths[1:]))
    # batch_norm adds a weight and bias per hidden unit
    bn = build("mlp", (d,), k, hidden=hidden, batch_norm=True)
    assert n_params(bn) == n_params(model) + 2 * sum(hidden)


def test_mlp_flattens_any_input_shape():
    model = build("mlp", (1, 4, 5), 2, hidden=[3])
    assert n_params(model) == linear_params(20, 3) + linear_params(3, 2)
    assert model(torch.randn(4, 1, 4, 5)).shape == (4, 2)


def test_mlp_activation_and_dropout():
    model = build("mlp", (4,), 2, hidden=[8, 8], activation="tanh", dropout=0.5)
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(m.p == 0.5 for m in drops)
    # dropout is active in train mode and off in eval mode
    x = torch.randn(64, 4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


def test_cnn_channels_and_head_size():
    # 8x8 -> pool -> 4x4 -> pool -> 2x2 (pooling stops once the image is narrower than 4)
    for channels, flat in (([32, 64], 64 * 2 * 2), ([4, 6, 8], 8 * 2 * 2), ([5], 5 * 4 * 4)):
        model = build("cnn", (1, 8, 8), 10, channels=channels, hidden=16)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == channels
        assert model.head[1].in_features == flat
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cnn_parameter_count_formula():
    c_in, channels, hidden, k = 3, [4, 6], 10, 5
    model = build("cnn", (c_in, 8, 8), k, channels=channels, hidden=hidden)
    convs = 4 * c_in * 9 + 2 * 4 + 6 * 4 * 9 + 2 * 6          # no conv bias with BatchNorm; BN weight+bias
    head = linear_params(6 * 2 * 2, hidden) + linear_params(hidden, k)
    assert n_params(model) == convs + head
    plain = build("cnn", (c_in, 8, 8), k, channels=channels, hidden=hidden, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_params(plain) == linear_params(c_in * 9, 4) + linear_params(4 * 9, 6) + head


def test_cnn1d_parameter_count_formula():
    c_in, length, channels, ks, hidden, k = 2, 40, [3, 5], 5, 12, 4
    model = build("cnn1d", (c_in, length), k, channels=channels, kernel_size=ks, hidden=hidden)
    convs = 3 * c_in * ks + 2 * 3 + 5 * 3 * ks + 2 * 5
    head = linear_params(5 * (length // 4), hidden) + linear_params(hidden, k)   # 40 -> 20 -> 10
    assert n_params(model) == convs + head
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.Conv1d)] == [(ks,), (ks,)]


@pytest.mark.parametrize("kernel_size", [3, 4, 5, 6])
@pytest.mark.parametrize("length", [10, 40, 41])
def test_cnn1d_any_kernel_size_runs(kernel_size, length):
    """A kernel size the recipe accepts must give a model whose forward works on the data's length."""
    model = build("cnn1d", (1, length), 3, channels=[4, 4], kernel_size=kernel_size, hidden=8)
    assert model(torch.randn(2, 1, length)).shape == (2, 3)


def gru_params(i, h, layers, directions):
    total, width = 0, i
    for _ in range(layers):
        total += directions * 3 * (h * width + h * h + 2 * h)
        width = h * directions
    return total


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_parameter_count_and_bidirectional_head(layers, bidirectional):
    c, hidden, k = 3, 8, 4
    model = build("gru", (c, 12), k, hidden=hidden, layers=layers, bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    assert model.head.in_features == hidden * directions
    assert n_params(model) == gru_params(c, hidden, layers, directions) + linear_params(hidden * directions, k)
    assert model(torch.randn(5, c, 12)).shape == (5, k)


def test_gru_reads_the_sequence_in_time_order():
    """The last state summarises the whole sequence: the output depends on the first time step,
    and (unidirectional) the head sees exactly the final hidden state of the top layer."""
    torch.manual_seed(0)
    model = build("gru", (2, 12), 3, hidden=6, layers=2).eval()
    x = torch.randn(4, 2, 12)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x2))
        seq, _ = model.rnn(x.transpose(1, 2))
        torch.testing.assert_close(model(x), model.head(seq[:, -1]))


def test_gru_bidirectional_uses_both_directions():
    torch.manual_seed(0)
    model = build("gru", (2, 10), 3, hidden=5, bidirectional=True, layers=2).eval()
    x = torch.randn(4, 2, 10)
    with torch.no_grad():
        seq, _ = model.rnn(x.transpose(1, 2))
        # forward direction's final state is at the last step, backward direction's at the first
        expected = model.head(torch.cat([seq[:, -1, :5], seq[:, 0, 5:]], dim=1))
        torch.testing.assert_close(model(x), expected)


def test_unknown_and_wrongly_typed_options_rejected():
    from torchdojo.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'hidden'"):
        build("gru", (1, 10), hidden_size=4)
    with pytest.raises(ConfigError) as info:
        build("mlp", (4,), activation="swish")
    assert info.value.path == "model.activation"


# -- a measured effect: each model fits a tiny separable problem ---------------------------------

def separable(name, n=64, seed=0):
    """Two classes whose inputs differ by a fixed pattern of +-1 plus small noise."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[name]
    pattern = torch.randn(*shape, generator=g).sign()
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, *shape, generator=g) + (2 * y.float() - 1).view(n, *[1] * len(shape)) * pattern
    return x, y


SMALL = {"mlp": {"hidden": [16]}, "cnn": {"channels": [8, 8], "hidden": 16},
         "cnn1d": {"channels": [8, 8], "hidden": 16}, "gru": {"hidden": 16},
         "moe_mlp": {"width": 16, "blocks": 1, "experts": 2, "expert_hidden": 16}}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_model_fits_a_tiny_separable_problem(name):
    torch.manual_seed(0)
    x, y = separable(name)
    model = build(name, SHAPES[name], 2, **SMALL[name])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    first = loss_fn(model(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
        final = loss_fn(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    assert first > 0.2                       # an untrained model is far from a perfect fit
    assert final < first / 20, (name, first, final)
    assert accuracy == 1.0
