"""``ContinualNetwork``: the interface every reference network implements."""

from __future__ import annotations

from torch import Tensor, nn


class ContinualNetwork(nn.Module):
    """A network with a separate read-out: ``forward(x) == head(features(x))``.

    Interventions reset ``head`` (the last layer) and representation measurements read
    ``features`` (the penultimate activations). Subclasses are built as
    ``Net(input_shape, num_outputs, **options)``, which lets a YAML recipe name them by their
    short class name as the ``network`` of :class:`ContinualClassifier`.
    """

    head: nn.Module

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
