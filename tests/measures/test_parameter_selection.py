import pytest
from torch import nn

from lightning_plasticity.measures.parameter_selection import select_parameters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.head_bias_only = nn.Linear(3, 3, bias=True)


def names(selection):
    return [n for n, _ in selection]


def test_default_is_all_trainable_in_order():
    net = Net()
    net.head_bias_only.weight.requires_grad_(False)
    sel = select_parameters(net)
    expected = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names(sel) == expected
    assert "head_bias_only.weight" not in names(sel)
    assert all(p is dict(net.named_parameters())[n] for n, p in sel)


def test_modules_exact_and_patterns():
    net = Net()
    assert names(select_parameters(net, modules=["head"])) == ["head.weight", "head.bias"]
    assert names(select_parameters(net, modules="head")) == ["head.weight", "head.bias"]
    # A container selects its children's parameters; patterns use fnmatch.
    assert names(select_parameters(net, modules=["encoder"])) == [
        "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
    ]
    assert names(select_parameters(net, modules=["encoder.*"])) == names(
        select_parameters(net, modules=["encoder"])
    )
    # Overlapping selections are deduplicated and keep model order.
    sel = select_parameters(net, modules=["head", "encoder.2", "encoder"])
    assert names(sel) == [
        "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
        "head.weight", "head.bias",
    ]


def test_last_n_layers_in_registration_order():
    net = Net()
    assert names(select_parameters(net, last_n_layers=1)) == [
        "head_bias_only.weight", "head_bias_only.bias",
    ]
    assert names(select_parameters(net, last_n_layers=2)) == [
        "head.weight", "head.bias", "head_bias_only.weight", "head_bias_only.bias",
    ]
    # MultiheadAttention owns in_proj_* directly and out_proj is a layer of its own.
    assert names(select_parameters(net, last_n_layers=4)) == [
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "head.weight", "head.bias", "head_bias_only.weight", "head_bias_only.bias",
    ]
    # More layers than exist: everything.
    assert names(select_parameters(net, last_n_layers=100)) == names(select_parameters(net))


def test_last_n_layers_skips_frozen_layers():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    net[2].requires_grad_(False)
    assert names(select_parameters(net, last_n_layers=1)) == ["1.weight", "1.bias"]


def test_no_trainable_parameters():
    net = nn.Sequential(nn.Linear(2, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        select_parameters(net)
    with pytest.raises(ValueError, match="requires_grad"):
        select_parameters(nn.ReLU())


def test_unknown_module_lists_available_names():
    with pytest.raises(ValueError, match=r"'decoder' matches no submodule.*'encoder'"):
        select_parameters(Net(), modules=["decoder"])


def test_frozen_modules_selection_is_an_error():
    net = Net()
    net.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(net, modules=["head"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(net, modules=["encoder.1"])  # the ReLU


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_last_n_layers(bad):
    with pytest.raises(ValueError, match="last_n_layers must be >= 1"):
        select_parameters(Net(), last_n_layers=bad)
    with pytest.raises(ValueError, match="positive int"):
        select_parameters(Net(), last_n_layers=1.5)  # type: ignore[arg-type]


def test_both_selectors_is_an_error():
    with pytest.raises(ValueError, match="either `modules` or `last_n_layers`"):
        select_parameters(Net(), modules=["head"], last_n_layers=1)
