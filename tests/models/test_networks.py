"""Tests for the reference networks in ``lightning_plasticity.models``."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.models.activations import (
    ACTIVATIONS,
    CReLU,
    activation_output_multiplier,
    make_activation,
)
from lightning_plasticity.models.base import ContinualNetwork
from lightning_plasticity.models.cnn import CNN
from lightning_plasticity.models.mlp import MLP
from lightning_plasticity.models.norms import make_norm
from lightning_plasticity.models.resnet import ResNet18
from lightning_plasticity.models.vit import ViT

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
VECTOR_SHAPE = (64,)
NUM_OUTPUTS = 5

# Small configurations keep the whole module well under the time budget on 2 CPU cores.
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": partial(MLP, width=16, depth=2),
    "cnn": partial(CNN, channels=(4, 8), hidden=16),
    "resnet": partial(ResNet18, width=4),
    "vit": partial(ViT, dim=16, depth=1, heads=2),
}
IMAGE_ONLY = ("cnn", "resnet", "vit")
NORMS = {
    "mlp": ("none", "layer", "batch"),
    "cnn": ("none", "layer", "batch"),
    "resnet": ("none", "layer", "batch"),
    "vit": ("none", "layer"),
}
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _shape_cases() -> list[tuple[str, tuple[int, ...]]]:
    cases = [(kind, shape) for kind in FACTORIES for shape in IMAGE_SHAPES]
    return [*cases, ("mlp", VECTOR_SHAPE)]


def _norm_cases() -> list[tuple[str, str]]:
    return [(kind, norm) for kind, norms in NORMS.items() for norm in norms]


def _batch(shape: tuple[int, ...], n: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("kind", "shape"), _shape_cases())
def test_output_and_feature_shapes(kind: str, shape: tuple[int, ...]) -> None:
    net = FACTORIES[kind](shape, NUM_OUTPUTS)
    x = _batch(shape)
    assert net(x).shape == (3, NUM_OUTPUTS)
    assert net.features(x).shape == (3, net.feature_dim)
    assert isinstance(net, ContinualNetwork)
    assert isinstance(net.head, nn.Linear)
    assert net.head.in_features == net.feature_dim
    assert net.head.out_features == NUM_OUTPUTS


@pytest.mark.parametrize("kind", IMAGE_ONLY)
def test_image_networks_reject_vector_inputs(kind: str) -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        FACTORIES[kind](VECTOR_SHAPE, NUM_OUTPUTS)


@pytest.mark.parametrize(("kind", "norm"), _norm_cases())
def test_features_then_head_equals_forward_in_float64(kind: str, norm: str) -> None:
    net = FACTORIES[kind]((1, 8, 8), NUM_OUTPUTS, norm=norm).double()
    assert all(p.dtype == torch.float64 for p in net.parameters())
    x = _batch((1, 8, 8), dtype=torch.float64)
    for train in (True, False):
        net.train(train)
        out = net(x)
        assert out.dtype == torch.float64
        torch.testing.assert_close(net.head(net.features(x)), out, rtol=0, atol=1e-12)


def _norm_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, NORM_TYPES)]


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_mlp_norm_modules(norm: str) -> None:
    net = MLP(VECTOR_SHAPE, NUM_OUTPUTS, width=16, depth=3, norm=norm)
    expected = {"none": nn.Identity, "layer": nn.LayerNorm, "batch": nn.BatchNorm1d}[norm]
    for layer in net.layers:
        assert type(layer.norm) is expected
    assert len(_norm_modules(net)) == (0 if norm == "none" else 3)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_cnn_norm_modules(norm: str) -> None:
    net = CNN((1, 8, 8), NUM_OUTPUTS, channels=(4, 8), hidden=16, norm=norm)
    conv_type = {"none": nn.Identity, "layer": nn.GroupNorm, "batch": nn.BatchNorm2d}[norm]
    fc_type = {"none": nn.Identity, "layer": nn.LayerNorm, "batch": nn.BatchNorm1d}[norm]
    for block in net.blocks:
        assert type(block.norm) is conv_type
        if norm == "layer":
            assert block.norm.num_groups == 1
    assert type(net.fc.norm) is fc_type
    assert len(_norm_modules(net)) == (0 if norm == "none" else 3)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_resnet_norm_modules(norm: str) -> None:
    net = ResNet18((3, 8, 8), NUM_OUTPUTS, width=4, norm=norm)
    norms = _norm_modules(net)
    # Stem + 2 per block x 8 blocks + 3 projection shortcuts.
    if norm == "none":
        assert norms == []
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is not None for c in convs), "without norms the convs need biases"
    else:
        expected = nn.GroupNorm if norm == "layer" else nn.BatchNorm2d
        assert len(norms) == 20
        assert all(type(m) is expected for m in norms)
        assert all(m.num_groups == 1 for m in norms if isinstance(m, nn.GroupNorm))
        assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_vit_norm_modules(norm: str) -> None:
    net = ViT((1, 8, 8), NUM_OUTPUTS, dim=16, depth=2, heads=2, norm=norm)
    norms = _norm_modules(net)
    assert len(norms) == (0 if norm == "none" else 2 * 2 + 1)
    assert all(type(m) is nn.LayerNorm for m in norms)
    assert type(net.norm) is (nn.Identity if norm == "none" else nn.LayerNorm)


def test_spatial_layer_norm_is_layer_norm_over_chw() -> None:
    norm = make_norm("layer", 6, spatial=True).double()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (6, 5, 5)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_make_activation(activation: str) -> None:
    expected = {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "crelu": CReLU,
    }[activation]
    module = make_activation(activation)
    assert type(module) is expected
    assert not getattr(module, "inplace", False)
    assert activation_output_multiplier(activation) == (2 if activation == "crelu" else 1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "vit"])
def test_networks_with_each_activation(kind: str, activation: str) -> None:
    net = FACTORIES[kind]((1, 8, 8), NUM_OUTPUTS, activation=activation)
    acts = [m for m in net.modules() if type(m) is type(make_activation(activation))]
    assert acts, f"no {activation} module found"
    out = net(_batch((1, 8, 8)))
    assert out.shape == (3, NUM_OUTPUTS)
    assert torch.isfinite(out).all()


def test_crelu_values_and_dim() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(CReLU()(x), torch.tensor([[1.0, 0.0, 0.5, 0.0, 2.0, 0.0]]))
    tokens = torch.randn(2, 7, 3)
    assert CReLU(dim=-1)(tokens).shape == (2, 7, 6)
    images = torch.randn(2, 3, 4, 4)
    assert CReLU()(images).shape == (2, 6, 4, 4)


def test_crelu_doubles_width() -> None:
    mlp = MLP(VECTOR_SHAPE, NUM_OUTPUTS, width=16, depth=2, activation="crelu")
    assert mlp.layers[0].linear.out_features == 16
    assert mlp.layers[1].linear.in_features == 32
    assert mlp.feature_dim == 32 and mlp.head.in_features == 32
    assert mlp.features(_batch(VECTOR_SHAPE)).shape == (3, 32)

    cnn = CNN((1, 8, 8), NUM_OUTPUTS, channels=(4, 8), hidden=16, activation="crelu")
    assert cnn.blocks[1].conv.in_channels == 8
    assert cnn.fc.linear.in_features == 16 * 2 * 2
    assert cnn.feature_dim == 32
    assert cnn.features(_batch((1, 8, 8))).shape == (3, 32)

    vit = ViT((1, 8, 8), NUM_OUTPUTS, dim=16, depth=1, heads=2, mlp_ratio=2.0, activation="crelu")
    assert vit.blocks[0].mlp.fc1.out_features == 32
    assert vit.blocks[0].mlp.fc2.in_features == 64
    assert vit(_batch((1, 8, 8))).shape == (3, NUM_OUTPUTS)


def test_depth_zero_mlp_is_linear() -> None:
    net = MLP((2, 3), NUM_OUTPUTS, depth=0)
    assert len(net.layers) == 0 and net.feature_dim == 6
    x = _batch((2, 3))
    torch.testing.assert_close(net(x), x.flatten(1) @ net.head.weight.T + net.head.bias)


def test_mlp_without_bias() -> None:
    net = MLP(VECTOR_SHAPE, NUM_OUTPUTS, width=8, bias=False)
    assert all(not name.endswith("bias") for name, _ in net.named_parameters())


def test_cnn_tiny_images_skip_pooling() -> None:
    net = CNN((1, 8, 8), NUM_OUTPUTS, channels=(4, 4, 4, 4, 4), hidden=8)
    pools = [type(block.pool) for block in net.blocks]
    assert pools == [nn.MaxPool2d] * 3 + [nn.Identity] * 2
    assert net.fc.linear.in_features == 4
    assert net(_batch((1, 8, 8))).shape == (3, NUM_OUTPUTS)
    # A 1-pixel-high image still halves its width.
    strip = CNN((1, 1, 8), NUM_OUTPUTS, channels=(4,), hidden=8)
    assert strip.blocks[0].pool.kernel_size == (1, 2)
    assert strip(_batch((1, 1, 8))).shape == (3, NUM_OUTPUTS)


def _spectral_weights(net: nn.Module) -> list[torch.Tensor]:
    return [
        m.weight.detach().flatten(1) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_spectral_norm_bounds_largest_singular_value(kind: str) -> None:
    shape = VECTOR_SHAPE if kind == "mlp" else (1, 8, 8)
    net = FACTORIES[kind](shape, NUM_OUTPUTS, spectral_norm=True)
    parametrized = [m for m in net.modules() if hasattr(m, "parametrizations")]
    expected = 3 if kind == "mlp" else 4  # hidden layers (+ convs) and the head
    assert len(parametrized) == expected
    assert net.head in parametrized
    with torch.no_grad():  # Scale the raw weights far above 1: the constraint must still hold.
        for m in parametrized:
            m.parametrizations.weight.original.mul_(10.0)
    net.train()
    for _ in range(5):  # Each training forward runs one power iteration.
        net(_batch(shape, n=4))
    for weight in _spectral_weights(net):
        sigma = torch.linalg.matrix_norm(weight, ord=2).item()
        assert 0.999 < sigma < 1.05


def test_spectral_norm_trains_and_deepcopies() -> None:
    net = MLP(VECTOR_SHAPE, NUM_OUTPUTS, width=16, spectral_norm=True)
    net(_batch(VECTOR_SHAPE)).sum().backward()
    originals = [p for n, p in net.named_parameters() if n.endswith("weight.original")]
    assert len(originals) == 3 and all(p.grad is not None for p in originals)
    clone = copy.deepcopy(net).eval()
    x = _batch(VECTOR_SHAPE)
    torch.testing.assert_close(clone(x), net.eval()(x))


GRADIENT_CASES = [
    *_norm_cases(),
    ("mlp_sn", "none"),
    ("cnn_sn", "batch"),
    ("vit_mean", "layer"),
]


@pytest.mark.parametrize(("kind", "norm"), GRADIENT_CASES)
def test_gradients_reach_every_parameter(kind: str, norm: str) -> None:
    base, _, variant = kind.partition("_")
    kwargs: dict[str, object] = {"norm": norm}
    if variant == "sn":
        kwargs["spectral_norm"] = True
    if variant == "mean":
        kwargs["pool"] = "mean"
    net = FACTORIES[base]((1, 8, 8), NUM_OUTPUTS, **kwargs)
    # tanh keeps every unit active, so an all-zero gradient would point at a wiring bug.
    if base in ("mlp", "cnn"):
        net = FACTORIES[base]((1, 8, 8), NUM_OUTPUTS, activation="tanh", **kwargs)
    net(_batch((1, 8, 8), n=4)).square().sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_float64_spectral_norm() -> None:
    net = CNN((1, 8, 8), NUM_OUTPUTS, channels=(4,), hidden=8, spectral_norm=True).double()
    assert net(_batch((1, 8, 8), dtype=torch.float64)).dtype == torch.float64


def _direct_param_modules_in_call_order(net: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in net.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, _i, name=name: order.append(name) if name not in order else None
                )
            )
    net(x)
    for handle in handles:
        handle.remove()
    return order


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_parameters_are_created_in_forward_order(kind: str) -> None:
    net = FACTORIES[kind]((1, 8, 8), NUM_OUTPUTS, norm="layer")
    owners: list[str] = []
    for name, _ in net.named_parameters():
        owner = name.rpartition(".")[0]
        # MultiheadAttention applies out_proj functionally; count it as part of attn.
        owner = owner.removesuffix(".out_proj")
        if owner not in owners:
            owners.append(owner)
    assert _direct_param_modules_in_call_order(net, _batch((1, 8, 8))) == owners


def test_readable_module_names() -> None:
    names = dict(MLP(VECTOR_SHAPE, 2, width=8, depth=2, norm="layer").named_modules())
    assert {"layers.0.linear", "layers.0.norm", "layers.0.act", "layers.1.act", "head"} <= set(
        names
    )
    names = dict(CNN((1, 8, 8), 2, channels=(4,), hidden=8).named_modules())
    assert {"blocks.0.conv", "blocks.0.norm", "blocks.0.act", "blocks.0.pool", "fc.act"} <= set(
        names
    )
    names = dict(ResNet18((1, 8, 8), 2, width=4).named_modules())
    assert {"conv1", "bn1", "relu", "layer1.0.act1", "layer4.1.act2", "head"} <= set(names)
    names = dict(ViT((1, 8, 8), 2, dim=8, depth=1, heads=2).named_modules())
    assert {"patch_embed", "blocks.0.attn", "blocks.0.mlp.act", "norm", "head"} <= set(names)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_each_activation_module_runs_once_per_forward(kind: str) -> None:
    net = FACTORIES[kind]((1, 8, 8), NUM_OUTPUTS)
    act_types = (nn.ReLU, nn.GELU)
    calls: dict[str, int] = {}
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str, _m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        calls[name] = calls.get(name, 0) + 1
        captured[name] = out

    acts = {n: m for n, m in net.named_modules() if isinstance(m, act_types)}
    for name, module in acts.items():
        module.register_forward_hook(partial(hook, name))
    net(_batch((1, 8, 8)))
    assert calls == dict.fromkeys(acts, 1)
    if kind in ("mlp", "cnn", "resnet"):
        # Captured ReLU outputs must not have been modified in place afterwards.
        assert all((out >= 0).all() for out in captured.values())


def test_resnet18_matches_torchvision() -> None:
    from torchvision.models import resnet18

    reference = resnet18(weights=None, num_classes=NUM_OUTPUTS)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    net = ResNet18((3, 8, 8), NUM_OUTPUTS)
    state = {k.replace("fc.", "head.", 1): v for k, v in reference.state_dict().items()}
    net.load_state_dict(state)
    reference.eval()
    net.eval()
    x = _batch((3, 8, 8), n=2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))
    assert sum(p.numel() for p in net.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def test_resnet_width_and_input_channels() -> None:
    net = ResNet18((1, 28, 28), NUM_OUTPUTS, width=2)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3)
    assert net.conv1.stride == (1, 1)
    assert [net.layer1[0].conv1.out_channels, net.layer4[1].conv2.out_channels] == [2, 16]
    assert net.feature_dim == 16


def test_vit_pooling() -> None:
    cls = ViT((1, 8, 8), NUM_OUTPUTS, dim=8, depth=1, heads=2, patch_size=2)
    mean = ViT((1, 8, 8), NUM_OUTPUTS, dim=8, depth=1, heads=2, patch_size=2, pool="mean")
    assert cls.tokens.position.shape == (1, 17, 8)
    assert mean.tokens.cls_token is None and mean.tokens.position.shape == (1, 16, 8)
    assert mean(_batch((1, 8, 8))).shape == (3, NUM_OUTPUTS)


def test_networks_pickle() -> None:
    # ddp_spawn and torch.save pickle the model.
    for kind, factory in FACTORIES.items():
        net = factory((1, 8, 8), NUM_OUTPUTS)
        clone = pickle.loads(pickle.dumps(net)).eval()
        x = _batch((1, 8, 8))
        torch.testing.assert_close(clone(x), net.eval()(x), msg=kind)


BAD_ARGS = [
    (lambda: MLP((64,), 3, width=0), "width must be an int >= 1"),
    (lambda: MLP((64,), 3, depth=-1), "depth must be an int >= 0"),
    (lambda: MLP((64,), 0), "num_outputs must be an int >= 1"),
    (lambda: MLP((64,), 3, norm="group"), "valid values are 'none', 'layer', 'batch'"),
    (lambda: MLP((64,), 3, activation="swish"), "valid names are 'relu'"),
    (lambda: MLP((), 3), "non-empty sequence of positive ints"),
    (lambda: MLP((0, 3), 3), "non-empty sequence of positive ints"),
    (lambda: MLP(64, 3), "sequence of ints"),
    (lambda: CNN((1, 8, 8), 3, channels=()), "channels must be a non-empty sequence"),
    (lambda: CNN((1, 8, 8), 3, channels=(4, 0)), "every entry of channels"),
    (lambda: CNN((1, 8, 8), 3, hidden=0), "hidden must be"),
    (lambda: CNN((1, 8, 8), 3, norm="instance"), "valid values are 'none', 'layer', 'batch'"),
    (lambda: ResNet18((3, 32, 32), 3, norm="bn"), "valid values are 'none', 'layer', 'batch'"),
    (lambda: ResNet18((3, 32, 32), 3, width=0), "width must be"),
    (lambda: ViT((1, 8, 8), 3, norm="batch"), "batch norm is not supported for ViT"),
    (lambda: ViT((1, 28, 28), 3, patch_size=5), "not a multiple of patch_size=5"),
    (lambda: ViT((1, 8, 8), 3, dim=10, heads=4), "divisible by heads"),
    (lambda: ViT((1, 8, 8), 3, pool="max"), "valid values are 'cls', 'mean'"),
    (lambda: ViT((1, 8, 8), 3, mlp_ratio=0.0), "mlp_ratio"),
    (lambda: make_activation("softplus"), "valid names are"),
    (lambda: activation_output_multiplier("softplus"), "valid names are"),
]


@pytest.mark.parametrize(("build", "message"), BAD_ARGS)
def test_bad_arguments_raise_helpful_errors(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


@pytest.mark.parametrize(
    ("class_path", "init_args"),
    [
        ("lightning_plasticity.models.mlp.MLP", {"width": 8, "activation": "crelu"}),
        ("lightning_plasticity.models.cnn.CNN", {"channels": [4, 8], "norm": "batch"}),
        ("lightning_plasticity.models.resnet.ResNet18", {"width": 2, "norm": "layer"}),
        ("lightning_plasticity.models.vit.ViT", {"dim": 8, "heads": 2, "depth": 1}),
    ],
)
def test_jsonargparse_network_factory(class_path: str, init_args: dict[str, object]) -> None:
    """The LightningModule receives ``network_factory`` as a callable class from a YAML config."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=Callable[[tuple[int, ...], int], nn.Module])
    config = parser.parse_object({"net": {"class_path": class_path, "init_args": init_args}})
    factory = parser.instantiate(config).net
    net = factory((1, 8, 8), NUM_OUTPUTS)
    assert net(_batch((1, 8, 8))).shape == (3, NUM_OUTPUTS)
