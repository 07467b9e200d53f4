"""The personalisation options of `fedlora rounds` (one spec, one field each) and the checks that involve the
method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedlora_cli.options import Spec, half_open, number, option

MAX_PERSONALIZE_EPOCHS = 1000.0  # as config.MAX_EPOCHS: more passes than any fine-tuning needs


@dataclass(frozen=True)
class PersonalSpec(Spec):
    """Per-client evaluation and local fine-tuning.

    `client_test_fraction` holds out that share of every client's shard as its local test split, before
    any training (seeded by --seed and the client id, stratified by label; STS-B by 0.2-wide score bins):
    clients train on the rest, and every evaluation scores each client's own model on its own local test
    split. `personalize_epochs` runs FedAvg + local fine-tuning: after the last round, each client trains the
    final global adapter on its local training split for E more epochs and keeps the result.
    """

    panel: ClassVar[str] = "Personalisation"

    client_test_fraction: float = option(
        0.0,
        "--client-test-fraction",
        check=half_open(0, 1),
        help="hold out this share of each client's shard as its local test split (seeded, stratified by "
        "label; never trained on): every evaluation scores each client's own model on it (0: off)",
    )
    personalize_epochs: float = option(
        0.0,
        "--personalize-epochs",
        check=number(0, MAX_PERSONALIZE_EPOCHS),
        resume_free=True,  # only the end of the run depends on it: a finished run may be resumed to add it
        help="after the last round, each client fine-tunes the final global adapter on its local training "
        "split for E epochs and keeps it (final/clients/); 0: off",
    )
    client_validation_fraction: float = option(
        0.0,
        "--client-validation-fraction",
        check=half_open(0, 1),
        help="hold out this share of each client's shard as its local validation split (seeded, stratified; "
        "never trained on), scored beside the local test: what a sweep tunes a per-client comparison on "
        "(0: off; needs --client-test-fraction)",
    )

    @property
    def evaluates_clients(self) -> bool:
        return self.client_test_fraction > 0

    def validate(self) -> None:
        if self.client_validation_fraction > 0 and not self.evaluates_clients:
            raise ValueError(
                "--client-validation-fraction is scored with the clients' local tests: set "
                "--client-test-fraction too"
            )
        if self.client_test_fraction + self.client_validation_fraction >= 1:
            raise ValueError(
                f"--client-test-fraction {self.client_test_fraction:g} and --client-validation-fraction "
                f"{self.client_validation_fraction:g} leave no training examples: keep their sum below 1"
            )


def personal_parts(method: str) -> tuple[str, ...]:
    """The parts of the adapter a method's clients keep (registry.Method.personal); () for a global method."""
    from fedlora_cli.strategies.registry import get_method

    return get_method(method).personal


def check_personal(config: Any) -> None:
    """What a personalised method (one whose clients keep parts of the adapter) cannot do, as one line each.

    `config` is a RoundsConfig; called from its `validate`.
    """
    method = config.aggregation.method
    if not personal_parts(method):
        return
    if config.select == "best" or config.early_stop is not None:
        flag = "--select best" if config.select == "best" else f"--early-stop {config.early_stop}"
        raise ValueError(
            f"{flag} chooses a round by the global adapter's validation score, but {method}'s clients keep "
            f"parts of their adapters, so there is no global adapter to score: drop {flag}"
        )
    if config.privacy.enabled:
        raise ValueError(
            f"--dp-clip with --aggregation {method}: differential privacy is implemented for global methods "
            "only"
        )
    if config.engine == "flower" and config.resuming and config.resume_from_round != 0:
        raise ValueError(
            f"--resume of a {method} run on --engine flower: its clients' personal parts lived in the "
            "ClientApps' Context.state, which ends with the run, and never reached the server; start it "
            "again (--resume-from-round 0), or resume personalised runs made with --engine local"
        )
