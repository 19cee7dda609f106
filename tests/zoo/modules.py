"""A zoo of small LightningModules written the way ordinary users write them.

Nothing here knows about ``lightning_plasticity``: the modules exist so that tests can check that
measurement callbacks work on arbitrary user code (odd batch formats, manual optimization,
several optimizers, frozen or tied weights, mixed precision, buffers and side effects, dropout,
batch norm, ...) and that attaching a measurement never changes training.

Everything is tiny and runs on CPU. All data is synthetic and generated from a
``torch.Generator`` seeded inside each dataset, so a loader yields the same batches however the
global RNG was left. Loaders use ``shuffle=False`` and ``num_workers=0``.

Use :data:`ZOO` (name -> :class:`ZooEntry`) and :func:`fit`. :class:`PlantedDeadUnits` and
:func:`planted_loader` are separate from the zoo: a ReLU network with a known number of units
that are dead on every input, for tests that must count them exactly.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel
from lightning.pytorch.demos.transformer import Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

BATCH_SIZE = 16
NUM_EXAMPLES = 64
IN_DIM = 20
NUM_CLASSES = 4
VOCAB = 33
SEQ_LEN = 12


# --------------------------------------------------------------------------------------------
# Synthetic datasets
# --------------------------------------------------------------------------------------------


class SyntheticClassification(Dataset):
    """Gaussian inputs labelled by a fixed random linear teacher; items are ``(x, y)``."""

    def __init__(
        self, n: int = NUM_EXAMPLES, dim: int = IN_DIM, classes: int = NUM_CLASSES, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        teacher = torch.randn(dim, classes, generator=g)
        self.y = (self.x @ teacher).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class DictClassification(SyntheticClassification):
    """Same data, but items are dicts ``{"image": x, "label": y}`` (torchvision/HF style)."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


class MetaClassification(SyntheticClassification):
    """Same data, but items are ``(x, y, index)`` where the index is an integer tensor."""

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)


class UnlabelledVectors(Dataset):
    """Bare input tensors without labels (what ``DemoModel`` and the GAN consume)."""

    def __init__(self, n: int = NUM_EXAMPLES, dim: int = 32, shift: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g) * 0.5 + shift

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


class SyntheticImages(Dataset):
    """``3x32x32`` images with a class-dependent colour offset; items are ``(image, label)``."""

    def __init__(self, n: int = NUM_EXAMPLES, classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        colours = torch.randn(classes, 3, 1, 1, generator=g)
        self.x = torch.randn(n, 3, 32, 32, generator=g) + colours[self.y]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class SyntheticTokens(Dataset):
    """Next-token prediction on arithmetic sequences ``start + k * stride (mod vocab)``.

    Items are ``(inputs, target)`` long tensors of shape ``(seq_len,)``, target shifted by one,
    exactly like the ``WikiText2`` demo dataset.
    """

    def __init__(
        self, n: int = NUM_EXAMPLES, seq_len: int = SEQ_LEN, vocab: int = VOCAB, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.tokens = (start + stride * torch.arange(seq_len + 1)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


class SyntheticSequences(Dataset):
    """Float sequences ``(T, D)`` whose class is set by a pattern added to one time step."""

    def __init__(
        self,
        n: int = NUM_EXAMPLES,
        length: int = 6,
        dim: int = 8,
        classes: int = NUM_CLASSES,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        patterns = torch.randn(classes, dim, generator=g)
        self.x = torch.randn(n, length, dim, generator=g)
        where = torch.randint(0, length, (n,), generator=g)
        self.x[torch.arange(n), where] += 2 * patterns[self.y]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class SyntheticRegression(Dataset):
    """Noisy linear regression with float targets of shape ``(1,)``."""

    def __init__(self, n: int = NUM_EXAMPLES, dim: int = IN_DIM, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g) / math.sqrt(dim)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class SyntheticMultiLabel(Dataset):
    """Multi-label targets: float ``{0, 1}`` vectors of shape ``(labels,)``."""

    def __init__(self, n: int = NUM_EXAMPLES, dim: int = IN_DIM, labels: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, labels, generator=g)
        self.y = (self.x @ w > 0).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def _loader(dataset: Dataset, batch_size: int = BATCH_SIZE) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _mlp(in_dim: int = IN_DIM, hidden: int = 32, out: int = NUM_CLASSES) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


# --------------------------------------------------------------------------------------------
# User modules
# --------------------------------------------------------------------------------------------


class NoForward(pl.LightningModule):
    """Users who never define ``forward()`` and call ``self.net(x)`` inside ``training_step``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class DictBatch(pl.LightningModule):
    """Users whose dataset yields dicts ``{"image": x, "label": y}``."""

    def __init__(self):
        super().__init__()
        self.model = _mlp()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


class MetaBatch(pl.LightningModule):
    """Users whose batches carry extra metadata ``(x, y, index)`` that the step ignores."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, 32), nn.Tanh())
        self.classifier = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y, _meta = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class ResNet18Classifier(pl.LightningModule):
    """Users who wrap a torchvision model (``resnet18``, batch norm, residuals) unchanged."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class ManualOptimization(pl.LightningModule):
    """Users who set ``automatic_optimization = False`` and step the optimizer themselves."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = _mlp(hidden=24)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TinyGAN(pl.LightningModule):
    """Users with two optimizers (a GAN), which Lightning 2.x requires to be manual."""

    def __init__(self, latent_dim: int = 4, data_dim: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(
            nn.Linear(latent_dim, 16), nn.LeakyReLU(0.2), nn.Linear(16, data_dim)
        )
        self.discriminator = nn.Sequential(
            nn.Linear(data_dim, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)
        )

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        real = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=self.device)
        ones = torch.ones(real.shape[0], 1, device=self.device)
        zeros = torch.zeros_like(ones)

        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        fake = self(z).detach()
        d_loss = 0.5 * (
            F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})
        self.log("train_loss", g_loss + d_loss)
        return {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        return [opt_g, opt_d]


class PlainMLP(pl.LightningModule):
    """The most common module: an MLP classifier; used for the trainer-flag entries."""

    def __init__(self, hidden: int = 32, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(IN_DIM, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, x):
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train_loss", loss)
        self.log("train_acc", acc)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class FrozenBackbone(pl.LightningModule):
    """Fine-tuning users: a frozen backbone and a trainable head; only the head is optimized."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()
        )
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=1e-3)


class TiedLanguageModel(pl.LightningModule):
    """Language-model users who tie the decoder weight to the embedding (shared parameter)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.mixer = nn.GRU(dim, dim, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        hidden, _ = self.mixer(self.embedding(tokens))
        return self.decoder(hidden)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        self.log("train_loss", loss)
        return {"loss": loss, "perplexity": loss.detach().exp()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-3)


class AttentionPooling(pl.LightningModule):
    """Users of ``nn.MultiheadAttention`` (batch_first) on ``(N, T, D)`` inputs, mean-pooled."""

    def __init__(self, dim: int = 8, width: int = 16, heads: int = 2):
        super().__init__()
        self.proj = nn.Linear(dim, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        h = self.proj(x)
        attended, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + attended)
        return self.head(h.mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-2)


class MSERegression(pl.LightningModule):
    """Regression users: float targets ``(N, 1)`` and ``F.mse_loss``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class FunctionalReLU(pl.LightningModule):
    """Users who apply ``F.relu`` in ``forward`` instead of ``nn.ReLU`` modules.

    ``make_planted(k)`` kills the first ``k`` units of ``fc1`` (zero weights, bias ``-1``) so they
    output zero for every input, and records ``k`` in ``planted_dead_units``. Other units may, by
    chance, also be dead on a given batch; :class:`PlantedDeadUnits` is the exact version.
    """

    planted_dead_units: int = 0

    def __init__(self, width: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    @torch.no_grad()
    def make_planted(self, k: int) -> "FunctionalReLU":
        self.fc1.weight[:k].zero_()
        self.fc1.bias[:k].fill_(-1.0)
        self.planted_dead_units = k
        return self

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class CounterBuffer(pl.LightningModule):
    """Users with side effects in ``training_step``: a step-counter buffer and an EMA teacher.

    ``calls`` is incremented and the teacher's parameters are moved towards the student's on
    every call, so anything that re-runs ``training_step`` would be visible here.
    """

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = decay
        self.net = _mlp()
        self.teacher = copy.deepcopy(self.net)
        self.teacher.requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            teacher_probs = self.teacher(x).softmax(dim=1)
        loss = F.cross_entropy(logits, y) + 0.1 * F.cross_entropy(logits, teacher_probs)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.net.parameters()):
                t.mul_(self.decay).add_(s.detach(), alpha=1 - self.decay)
        self.log("train_loss", loss)
        self.log("calls", self.calls.float())
        return {"loss": loss, "calls": self.calls.clone()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-3)


class MultiLabelBCE(pl.LightningModule):
    """Multi-label users: float ``{0, 1}`` targets ``(N, 5)`` with BCE-with-logits."""

    def __init__(self, labels: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN_DIM, 32), nn.SiLU())
        self.out = nn.Linear(32, labels)

    def forward(self, x):
        return self.out(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "preds": (logits.detach() > 0).float()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-3)


class TorchReLUDropout(pl.LightningModule):
    """Like :class:`FunctionalReLU` but with ``torch.relu`` and an ``nn.Dropout(0.1)``.

    Dropout consumes the global RNG in training mode, so a measurement that touches the RNG
    would change the training trajectory.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, width)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


class BatchNormMLP(pl.LightningModule):
    """Users with ``nn.BatchNorm1d``: running statistics change on every training forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# --------------------------------------------------------------------------------------------
# Lightning's own demo modules, used as shipped
# --------------------------------------------------------------------------------------------


def _boring_loader() -> DataLoader:
    # BoringModel's own loader: DataLoader(RandomDataset(32, 64)) (batch size 1), which draws
    # from the global RNG; fork and seed it so the data is the same on every call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return BoringModel().train_dataloader()


class SyntheticTokenTransformer(LightningTransformer):
    """Lightning's ``LightningTransformer`` demo, pointed at synthetic tokens.

    The shipped class downloads WikiText2 in ``prepare_data`` (which ``Trainer.fit`` always
    calls), so, like a user with their own corpus, we override only the data hooks; the model,
    ``forward``, ``training_step`` and optimizer are the shipped ones. The shipped constructor
    only takes ``vocab_size``; for test speed the demo's own ``Transformer`` is rebuilt 16 wide
    with one encoder and one decoder layer (the 200-wide default makes curvature measurements
    take minutes on a CPU).
    """

    def __init__(self, vocab_size: int = VOCAB) -> None:
        super().__init__(vocab_size=vocab_size)
        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=16, nlayers=1)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return _loader(SyntheticTokens(vocab=self.model.vocab_size))


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


@dataclass
class ZooEntry:
    """A user module, its training loader and the Trainer flags it is meant to run with."""

    name: str
    make_module: Callable[[], pl.LightningModule]  # fresh module; caller seeds torch first
    make_dataloader: Callable[[], DataLoader]  # training loader, shuffle=False, deterministic
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def _classification_loader() -> DataLoader:
    return _loader(SyntheticClassification())


_ENTRIES = [
    ZooEntry(
        "boring",
        BoringModel,
        _boring_loader,
        notes="Lightning's BoringModel as shipped: Linear(32, 2), forward(), returns "
        "{'loss': ...}, no labels (batch is a bare (1, 32) tensor, batch size 1), SGD lr 0.1 "
        "with a per-epoch StepLR; does not call self.log.",
    ),
    ZooEntry(
        "demo_model",
        DemoModel,
        lambda: _loader(UnlabelledVectors(dim=32)),
        notes="Lightning's DemoModel as shipped: relu(Linear(32, 10)), loss = output.sum(), "
        "batch is a bare (16, 32) tensor, Adam lr 0.02; does not call self.log.",
    ),
    ZooEntry(
        "lightning_transformer",
        SyntheticTokenTransformer,
        lambda: _loader(SyntheticTokens()),
        notes="Lightning's LightningTransformer (only prepare_data/train_dataloader overridden: "
        "the shipped prepare_data downloads WikiText2), vocab 33, nn.Transformer 200 wide, "
        "2 encoder + 2 decoder layers, dropout 0.2, forward(inputs, target), batch "
        "(inputs, target) long tensors (16, 12), NLL on log-softmax, SGD lr 0.1; "
        "a plain tensor attribute (positional encoding) created lazily on first forward; "
        "does not call self.log.",
    ),
    ZooEntry(
        "no_forward",
        NoForward,
        _classification_loader,
        notes="no forward(); training_step calls self.net(x); returns the loss tensor.",
    ),
    ZooEntry(
        "dict_batch",
        DictBatch,
        lambda: _loader(DictClassification()),
        notes="batches are dicts {'image': x, 'label': y}; returns {'loss': loss}; SGD momentum.",
    ),
    ZooEntry(
        "meta_batch",
        MetaBatch,
        lambda: _loader(MetaClassification()),
        notes="batches are (x, y, index) with an integer index tensor the step ignores; returns "
        "{'loss', 'logits'}.",
    ),
    ZooEntry(
        "resnet18",
        lambda: ResNet18Classifier(num_classes=2),
        lambda: _loader(SyntheticImages(classes=2), batch_size=8),
        notes="torchvision resnet18(num_classes=2) on 3x32x32 images, batch 8, batch norm, "
        "SGD with weight decay and a per-step StepLR scheduler; save_hyperparameters().",
    ),
    ZooEntry(
        "manual_opt",
        ManualOptimization,
        _classification_loader,
        notes="automatic_optimization=False, Adam; training_step returns None.",
    ),
    ZooEntry(
        "two_optimizers",
        TinyGAN,
        lambda: _loader(UnlabelledVectors(dim=8, shift=1.0)),
        notes="GAN with two Adam optimizers under manual optimization (toggle_optimizer); batch "
        "is a bare (16, 8) tensor of real samples; noise from the global RNG; each batch makes "
        "two optimizer steps (global_step += 2).",
    ),
    ZooEntry(
        "accumulate",
        PlainMLP,
        _classification_loader,
        trainer_kwargs={"accumulate_grad_batches": 2},
        notes="plain MLP with accumulate_grad_batches=2 (two batches per optimizer step).",
    ),
    ZooEntry(
        "bf16",
        PlainMLP,
        _classification_loader,
        trainer_kwargs={"precision": "bf16-mixed"},
        notes="plain MLP under precision='bf16-mixed' (CPU autocast to bfloat16).",
    ),
    ZooEntry(
        "frozen_backbone",
        FrozenBackbone,
        _classification_loader,
        notes="backbone parameters requires_grad=False; optimizer only gets the head.",
    ),
    ZooEntry(
        "weight_tying",
        TiedLanguageModel,
        lambda: _loader(SyntheticTokens()),
        notes="embedding + GRU + decoder with decoder.weight = embedding.weight (one shared "
        "Parameter under two names); token ids (16, 12); returns {'loss', 'perplexity'}.",
    ),
    ZooEntry(
        "multihead_attention",
        AttentionPooling,
        lambda: _loader(SyntheticSequences()),
        notes="nn.MultiheadAttention(batch_first=True) on (16, 6, 8) inputs, LayerNorm, "
        "mean-pool, linear head; AdamW.",
    ),
    ZooEntry(
        "mse_regression",
        MSERegression,
        lambda: _loader(SyntheticRegression()),
        notes="float targets (16, 1), F.mse_loss, GELU; returns {'loss': loss}.",
    ),
    ZooEntry(
        "functional_relu",
        FunctionalReLU,
        _classification_loader,
        notes="F.relu between nn.Linear layers (no activation modules); has "
        "planted_dead_units and make_planted(k).",
    ),
    ZooEntry(
        "counter_buffer",
        CounterBuffer,
        _classification_loader,
        notes="buffer 'calls' incremented in training_step and an EMA teacher (decay 0.9, no "
        "grads) updated in training_step: side effects a measurement must not trigger.",
    ),
    ZooEntry(
        "multilabel_bce",
        MultiLabelBCE,
        lambda: _loader(SyntheticMultiLabel()),
        notes="multi-label float {0,1} targets (16, 5), binary_cross_entropy_with_logits.",
    ),
    ZooEntry(
        "torch_relu",
        TorchReLUDropout,
        _classification_loader,
        notes="torch.relu in forward plus nn.Dropout(0.1): training consumes the global RNG.",
    ),
    ZooEntry(
        "batchnorm",
        BatchNormMLP,
        _classification_loader,
        notes="nn.BatchNorm1d: running_mean/var and num_batches_tracked change in training.",
    ),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def fit(
    entry: ZooEntry, callbacks=(), max_steps: int = 8, seed: int = 0, **overrides
) -> tuple[pl.Trainer, pl.LightningModule]:
    """Seed, build ``entry``'s module and loader, and fit for ``max_steps`` steps on CPU.

    ``overrides`` are extra ``Trainer`` arguments; they win over the defaults below and over
    ``entry.trainer_kwargs``.
    """
    pl.seed_everything(seed, verbose=False)
    module = entry.make_module()
    loader = entry.make_dataloader()
    kwargs: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": list(callbacks),
        **entry.trainer_kwargs,
        **overrides,
    }
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer, module


# --------------------------------------------------------------------------------------------
# A network with an exactly known number of dead units (not part of the zoo)
# --------------------------------------------------------------------------------------------


class PlantedDeadUnits(pl.LightningModule):
    """A one-hidden-layer ReLU classifier with exactly ``dead`` hidden units dead on all inputs.

    Units ``0 .. dead-1`` of ``fc1`` have zero weights and bias ``-1`` (pre-activation is always
    ``-1``); the others have bias ``+1`` and weights of scale ``0.1 / sqrt(in_dim)``, so on the
    ``N(0, 1)`` inputs of :func:`planted_loader` their pre-activation is ``1 +- ~0.1`` and they are
    active on every input. Dead units get zero gradient, so they stay dead under training.
    """

    def __init__(self, dead: int = 16, width: int = 128, in_dim: int = 20, classes: int = 4):
        super().__init__()
        if not 0 <= dead <= width:
            raise ValueError(f"dead={dead} must be in [0, width={width}]")
        self.save_hyperparameters()
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, classes)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, 0.1 / math.sqrt(in_dim))
            self.fc1.bias.fill_(1.0)
            self.fc1.weight[:dead].zero_()
            self.fc1.bias[:dead].fill_(-1.0)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def planted_loader(n: int = NUM_EXAMPLES, in_dim: int = 20, classes: int = 4) -> DataLoader:
    """``N(0, 1)`` inputs of ``in_dim`` features with ``classes`` labels, batch size 16."""
    return _loader(SyntheticClassification(n=n, dim=in_dim, classes=classes, seed=7))
