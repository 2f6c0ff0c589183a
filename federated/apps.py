"""Flower ClientApp: FedAgain's client (benchmark error before local Adam training)."""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import Field, ValidationInfo, field_validator

from federated.autoencoder import ConvAutoencoder, benchmark_error, fit, reconstruction_error
from federated.clients import DataSettings, Federation, build_federation, forge
from federated.strategies import BENCHMARK_KEY, ERROR_KEY, PARTITION_KEY

_FEDERATIONS: dict[str, Federation] = {}


class ClientSettings(DataSettings):
    """Data settings plus local training and fault injection."""

    local_epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=2)
    latent_dim: int = Field(32, ge=1)
    width: int = Field(16, ge=1, description="channels of the first conv layer")
    crash_clients: list[int] = Field([], description="partitions whose ClientApp raises (fault test)")
    vanish_clients: list[int] = Field([], description="partitions whose process dies mid-round")

    @field_validator("crash_clients", "vanish_clients")
    @classmethod
    def _fault_ids_exist(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        clients = info.data.get("clients")
        if clients is not None and any(not 0 <= pid < clients for pid in ids):
            raise ValueError(f"partition ids must be in [0, clients={clients})")
        return ids


def federation(settings: DataSettings) -> Federation:
    """The federation's data, built once per process (each Ray actor builds its own)."""
    key = settings.model_dump_json(include=set(DataSettings.model_fields))
    if key not in _FEDERATIONS:
        _FEDERATIONS[key] = build_federation(settings)
    return _FEDERATIONS[key]


def build_model(settings: ClientSettings, image_shape: tuple[int, ...]) -> ConvAutoencoder:
    channels, size, _ = image_shape
    return ConvAutoencoder(channels, size, settings.latent_dim, settings.width)


def _setup(msg: Message, context: Context, settings: ClientSettings):
    torch.set_num_threads(1)
    pid = int(context.node_config[PARTITION_KEY])
    if pid in settings.crash_clients:
        raise RuntimeError(f"injected failure on partition {pid}")
    fed = federation(settings)
    images = fed.train[pid]
    model = build_model(settings, images.shape[1:])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    # Ray exposes a GPU to the actor only when client_resources grant one
    return pid, fed.roles[pid], images, model.to("cuda" if torch.cuda.is_available() else "cpu")


def make_client_app(settings: ClientSettings) -> ClientApp:
    """ClientApp whose train/evaluate handlers read their partition from ``settings``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """e_i with the received model (if the strategy asks), local Adam, reply (arrays,
        num-examples, e_i, pid). A ``vanish_clients`` partition's process exits mid-round."""
        pid, role, images, model = _setup(msg, context, settings)
        config = msg.content["config"]
        wants_error = bool(config.get(BENCHMARK_KEY, False))
        error = {ERROR_KEY: benchmark_error(model, images, settings.batch_size)} if wants_error else {}
        received = {k: v.cpu().clone() for k, v in model.state_dict().items()}
        server_round = int(config["server-round"])
        seed = settings.seed * 1_000_003 + server_round * 1_009 + pid
        loss = fit(model, images, settings.local_epochs, settings.lr, settings.batch_size, seed)
        if pid in settings.vanish_clients:
            os._exit(1)  # the actor dies without replying; Ray restarts it
        state = model.cpu().state_dict()
        if role.kind == "forger":
            gen = torch.Generator().manual_seed(seed)
            state = forge(state, received, settings.forger_attack, settings.forger_scale, gen)
        metrics = MetricRecord(
            {"num-examples": len(images), **error, "train_loss": loss, PARTITION_KEY: pid}
        )
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Mean reconstruction MSE of the global model on the local data."""
        _, _, images, model = _setup(msg, context, settings)
        loss = float(reconstruction_error(model, images).mean())
        metrics = MetricRecord({"num-examples": len(images), "eval_loss": loss})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
