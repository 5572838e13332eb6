"""The record-level guarantee, attacked from the server's side.

Each test plays a curious server that knows everything in the run config and the
messages (seed, round, partition id, σ, C, B) and tries to undo the mechanism:
replay the noise, reopen a spent budget, or read the record count from a reply.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

import client.app as client_app
import client.train_evaluate as client_training
import client.training.dp_training as dp_training
from client.data.local_data import load_client_shard
from client.node_settings import NodeSettings
from client.privacy.ledger_store import LEDGER_FILE, ledger_lock
from client.privacy.policy import POLICY_FILE, PolicyError, PrivacyPolicy
from common.config import ConfigError, RunConfig
from common.ledger import chain as ledger_chain
from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.dp_sgd_plan import RoundPlan, plan_dp_sgd_round
from common.privacy.randomness import reproducible_seed, round_generator
from common.tasks.models import build_model
from common.wire.reply import EvaluateReport, TrainReport
from common.wire.reply_fields import COMPRESSED_CHANGE_KEY, EVAL_METRICS, Status
from server.results.client_outcomes import outcome_from_reply
from server.strategies.private_fedavg import PrivateFedAvg
from tests.helpers.device import device_context, digits_npz, write_policy
from tests.helpers.messages import evaluate_message, make_context, train_message
from tests.helpers.server_attacks import replayed_noise

SIGMA = 40.0  # noise ≈ 8x the largest possible signal, so a replay shows plainly
PARTITION, ROUND = 3, 2


def _weights(model_or_arrays: object) -> list[torch.Tensor]:
    if isinstance(model_or_arrays, ArrayRecord):
        state = model_or_arrays.to_torch_state_dict()
        return [state[k].detach().clone() for k in state]
    return [p.detach().clone() for p in model_or_arrays.parameters()]  # type: ignore[attr-defined]


def _replay_attack(
    mode: str, reproducible: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[float, float]:
    """(‖residual‖ / ‖replayed noise‖, residual bound if the replay were right / ‖noise‖).

    With plain SGD (lr η, no momentum) a round moves the weights by
    η/E · Σ_t (clipped sum_t + noise_t). Subtracting the replayed noise leaves
    Σ_t clipped sum_t, whose norm is at most steps · N · C, if the replay is right.
    """
    cfg = RunConfig(
        num_rounds=3, target_epsilon=0.0, noise_multiplier=SIGMA, epsilon_budget=1e6,
        grad_sample_mode=mode, reproducible_noise=reproducible,
        update_compression="none",  # the attack reads the float32 weights
    )  # fmt: skip
    ctx = make_context(cfg, PARTITION)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, ROUND), ctx)
    assert TrainReport.from_content(reply.content).status is Status.TRAINED
    n_records = len(load_client_shard(cfg, NodeSettings(PARTITION, 10)).x_train)

    guess = reproducible_seed(cfg.seed, PARTITION, ROUND)  # all the server can know
    noise, expected_batch = replayed_noise(cfg, n_records, SIGMA, guess, monkeypatch)
    moved = [
        (before - after) * expected_batch / cfg.learning_rate
        for before, after in zip(
            _weights(initial), _weights(reply.content["arrays"]), strict=True
        )
    ]
    residual = torch.cat([(m - n).flatten() for m, n in zip(moved, noise, strict=True)])
    noise_norm = float(torch.cat([n.flatten() for n in noise]).norm())
    steps = plan_dp_sgd_round(n_records, cfg.batch_size, cfg.local_epochs).steps
    signal_bound = steps * n_records * cfg.max_grad_norm
    return float(residual.norm()) / noise_norm, signal_bound / noise_norm


@pytest.mark.parametrize("mode", ["direct", "hooks"])
def test_replaying_the_noise_fails(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server replays every draw it could predict; the noise stays in the update."""
    ratio, bound = _replay_attack(mode, reproducible=False, monkeypatch=monkeypatch)
    print(f"replay residual / noise, {mode}, OS entropy: {ratio:.4f} (bound {bound:.4f})")
    assert bound < 0.2  # a successful replay would leave less than this
    assert 1.2 < ratio < 1.6  # residual = signal + noise − unrelated noise: ≈ √2 · noise


@pytest.mark.parametrize("mode", ["direct", "hooks"])
def test_reproducible_noise_is_replayable(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reproducible-noise = true the same attack strips the noise (it says so)."""
    ratio, bound = _replay_attack(mode, reproducible=True, monkeypatch=monkeypatch)
    print(f"replay residual / noise, {mode}, reproducible: {ratio:.4f} (bound {bound:.4f})")
    assert ratio <= bound < 0.2


def test_two_rounds_with_identical_inputs_draw_different_noise() -> None:
    """Same weights, data, seed, round and partition: different updates (float32
    weights: a compressed change differs anyway, by its stochastic rounding)."""
    cfg = RunConfig(num_rounds=3, update_compression="none")
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    first = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    second = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    a, b = _weights(first.content["arrays"]), _weights(second.content["arrays"])
    assert all(not torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # … unless the run asks for replayable noise (simulation research only)
    cfg = RunConfig(num_rounds=3, reproducible_noise=True, update_compression="none")
    first = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    second = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    a, b = _weights(first.content["arrays"]), _weights(second.content["arrays"])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _encoded_change(cfg: RunConfig) -> bytes:
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    (array,) = reply.content[COMPRESSED_CHANGE_KEY].values()
    return array.data


def test_reproducible_noise_replays_the_codec_rounding_too() -> None:
    """With the default codec (int4, stochastic rounding) reproducible-noise gives
    byte-identical replies, rounding included; without it every reply differs."""
    cfg = RunConfig(num_rounds=3)
    assert cfg.update_compression == "int4"
    assert _encoded_change(cfg) != _encoded_change(cfg)
    cfg = RunConfig(num_rounds=3, reproducible_noise=True)
    assert _encoded_change(cfg) == _encoded_change(cfg)


def test_noise_construction_has_the_requested_std() -> None:
    """Four draws summed and halved: still N(0, std²) per coordinate."""
    from common.privacy.randomness import gaussian_noise

    noise = gaussian_noise(3.0, torch.zeros(200_000), round_generator())
    assert abs(float(noise.std()) - 3.0) < 0.03 and abs(float(noise.mean())) < 0.03


# --- the device owns its policy ---------------------------------------------------------


def _exhausted_device(tmp_path: Path) -> tuple[Path, Path]:
    """A device whose policy caps ε at 2 (δ 1e-5, σ ≥ 0.8) and whose ledger is spent."""
    data = digits_npz(tmp_path / "d.npz", 300)
    state = write_policy(
        tmp_path / "state", **{"epsilon-budget": 2.0, "min-noise-multiplier": 0.8}
    )
    spent = PrivacyLedger("rdp", 1e-5).extended(1, 2.5, 0.1, 108, run_id=3)
    assert 1.99 < spent.epsilon() <= 2.0  # no further round fits
    (state / LEDGER_FILE).write_text(spent.to_json())
    return data, state


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"delta": 0.01}, "'delta'"),
        ({"privacy_mode": "none", "target_epsilon": 0.0}, "'privacy-mode'"),
        (
            {"noise_multiplier": 0.5, "target_epsilon": 0.0, "epsilon_budget": 2.0},
            "'noise-multiplier'",
        ),  # fmt: skip
        ({"epsilon_budget": 50.0}, "'epsilon-budget'"),
        ({"target_epsilon": 0.0, "noise_multiplier": 1.0}, "'epsilon-budget'"),  # no cap
        ({"reproducible_noise": True}, "'reproducible-noise'"),
    ],
)
def test_an_exhausted_device_refuses_every_weaker_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, key: str
) -> None:
    """The server cannot reopen a spent budget: nothing trains, the ledger is untouched."""
    data, state = _exhausted_device(tmp_path)
    before = (state / LEDGER_FILE).read_bytes()

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("trained against the device's policy")

    monkeypatch.setattr(client_training, "train_private", forbidden)
    monkeypatch.setattr(client_training, "train_non_private", forbidden)
    cfg = RunConfig(**{"num_rounds": 3, "target_epsilon": 2.0, **overrides})
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED, report
    assert f"run config key {key}" in str(report.reason)
    assert f"{POLICY_FILE} in the node's state-dir" in str(report.reason)
    assert str(tmp_path) not in str(report.reason)  # no folder names leave the device
    assert "arrays" not in reply.content.array_records
    assert (state / LEDGER_FILE).read_bytes() == before


def test_a_calibrated_sigma_below_the_policy_minimum_is_refused(tmp_path: Path) -> None:
    """target-epsilon sets σ indirectly; the node checks the σ it would use."""
    data = digits_npz(tmp_path / "d.npz", 300)
    state = write_policy(tmp_path / "state", **{"min-noise-multiplier": 2.0})
    cfg = RunConfig(num_rounds=1, target_epsilon=8.0)  # one round at ε 8: σ ≈ 0.8
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED
    assert "run config key 'target-epsilon' gives σ = " in str(report.reason)
    assert not (state / LEDGER_FILE).exists()


def test_the_policy_budget_refuses_even_when_the_run_budget_allows(tmp_path: Path) -> None:
    """A run within the policy still cannot pass the device's lifetime budget."""
    data, state = _exhausted_device(tmp_path)
    before = (state / LEDGER_FILE).read_bytes()
    cfg = RunConfig(num_rounds=3, target_epsilon=2.0)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.BUDGET_EXHAUSTED
    assert (state / LEDGER_FILE).read_bytes() == before


def test_a_ledger_keeps_its_delta(tmp_path: Path) -> None:
    """A policy whose δ differs from the stored ledger's is refused, not re-accounted."""
    data, state = _exhausted_device(tmp_path)
    write_policy(state, **{"epsilon-budget": 2.0, "delta": 1e-3})
    cfg = RunConfig(num_rounds=3, target_epsilon=2.0, delta=1e-3)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED
    assert "δ = 1e-05 and keeps it forever" in str(report.reason)


def test_a_device_without_a_policy_refuses(tmp_path: Path) -> None:
    """No policy file: refuse, naming the file, rather than trust the run config."""
    data = digits_npz(tmp_path / "d.npz", 200)
    cfg = RunConfig(num_rounds=3)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    ctx = device_context(cfg, data, tmp_path / "state")
    report = TrainReport.from_content(
        client_app.train(train_message(initial, 1), ctx).content
    )
    assert report.status is Status.POLICY_REFUSED
    assert f"no privacy policy ({POLICY_FILE} in the node's state-dir)" in str(
        report.reason
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delta = 1e-5\n", "'epsilon-budget'"),
        ("epsilon-budget = 3.0\ndelta = 2.0\n", "'delta'"),
        ('epsilon-budget = "3"\ndelta = 1e-5\n', "'epsilon-budget'"),
        (
            "epsilon-budget = 3.0\ndelta = 1e-5\nallow-non-private = 1\n",
            "'allow-non-private'",
        ),
        ('epsilon-budget = 3.0\ndelta = 1e-5\ncolour = "red"\n', "'colour'"),
        ("epsilon-budget = [", "unreadable"),
        ('epsilon-budget = 3.0\ndelta = 1e-5\naccountant = "gdp"\n', "'accountant'"),
        (
            "epsilon-budget = 3.0\ndelta = 1e-5\nplanning-records = 0\n",
            "'planning-records'",
        ),
    ],
)
def test_a_bad_policy_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Every bad policy fails with the file and the key named."""
    (tmp_path / POLICY_FILE).write_text(text)
    with pytest.raises(PolicyError, match=message) as info:
        PrivacyPolicy.from_file(tmp_path / POLICY_FILE)
    assert f"{POLICY_FILE} in the node's state-dir" in str(info.value)


def test_delta_not_below_one_over_n_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """δ ≥ 1/N could release a whole record; the log names δ and N, the reply not N."""
    cfg = RunConfig(num_rounds=3, delta=0.01)  # a digits shard has 144 records
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    with caplog.at_level(logging.WARNING, logger="privfed.client"):
        reply = client_app.train(train_message(initial, 1), make_context(cfg, PARTITION))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED
    assert "δ = 0.01 is not below 1/N" in str(report.reason)
    assert "144" not in str(report.reason)
    assert "1/N = 1/144" in caplog.text and "N = 144" in caplog.text


# --- nothing in a reply tells the server N ---------------------------------------------


def _device_reply(tmp_path: Path, n: int, release_ledger: bool) -> Message:
    data = digits_npz(tmp_path / f"d{n}.npz", n)
    state = write_policy(tmp_path / f"state{n}", **{"release-ledger": release_ledger})
    cfg = RunConfig(num_rounds=3, batch_size=32, target_epsilon=3.0, epsilon_budget=3.0)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    return client_app.train(train_message(initial, 1), device_context(cfg, data, state))


def test_neighbouring_devices_send_identical_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """320 vs 321 records (⌈N/B⌉ differs): only the DP-covered weights differ.

    The ledger-head fingerprint is salted with a random secret per device; with the
    salts made equal, it too is identical, so it says nothing about N either."""
    monkeypatch.setattr(ledger_chain.secrets, "token_hex", lambda n: "5a" * n)
    small = _device_reply(tmp_path / "a", 320, release_ledger=False)
    large = _device_reply(tmp_path / "b", 321, release_ledger=False)
    assert dict(small.content["report"]) == dict(large.content["report"])
    assert ledger_chain.REPLY_HEAD_KEY in small.content["report"]
    assert (
        set(small.content.keys())
        == set(large.content.keys())
        == {
            "report",
            COMPRESSED_CHANGE_KEY,  # the default update-compression's encoded change
        }
    )
    # Both plan from their policy's planning-records (512), not from ⌈N/B⌉: even the
    # released ledgers (σ, q, steps) agree, and so does the update's noise scale.
    small = _device_reply(tmp_path / "c", 320, release_ledger=True)
    large = _device_reply(tmp_path / "d", 321, release_ledger=True)
    assert dict(small.content["report"]) == dict(large.content["report"])
    ledger = TrainReport.from_content(small.content).ledger
    assert ledger is not None and ledger.history()[0][1:] == (1 / 16, 16)


# --- Attack 3: one record must not flip a device's plan ---------------------------------
# δ = 1/256.5: 1/δ lies between N = 256 and N = 257, so a δ < 1/N check on the exact N
# refuses one device and not the other, and a plan from N rounded up to a power of two
# gives q 1/8, 8 steps at 256 and q 1/16, 16 steps at 257.
EDGE_DELTA = 1 / 256.5


def _edge_device(
    tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch, **policy: object
) -> tuple[Message, list[tuple[RoundPlan, float]]]:
    """A device holding ``n`` records; its reply and the (plan, σ) it trained with."""
    monkeypatch.setattr(ledger_chain.secrets, "token_hex", lambda k: "5a" * k)
    trained: list[tuple[RoundPlan, float]] = []
    real = dp_training.train_private

    def spy(*args: object) -> object:
        trained.append((args[4], args[5]))  # type: ignore[arg-type]
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(client_training, "train_private", spy)
    data = digits_npz(tmp_path / f"d{n}.npz", n)
    keys = {"delta": EDGE_DELTA, "epsilon-budget": 3.0, **policy}
    state = write_policy(tmp_path / f"state{n}", **keys)
    cfg = RunConfig(num_rounds=3, batch_size=32, target_epsilon=3.0, epsilon_budget=3.0,
                    delta=EDGE_DELTA)  # fmt: skip
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    return reply, trained


def test_attack3_one_added_record_does_not_change_a_devices_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 3: the server compares two devices with the same policy and N = 256 and
    N = 257. Both train with the same q, steps, σ and noise divisor (planned from
    planning-records = 256), neither refuses at the δ edge, and their reports,
    released ledgers included, are identical: one record is not detected."""
    small, small_plan = _edge_device(
        tmp_path, 256, monkeypatch, **{"planning-records": 256}
    )
    large, large_plan = _edge_device(
        tmp_path, 257, monkeypatch, **{"planning-records": 256}
    )
    assert TrainReport.from_content(small.content).status is Status.TRAINED
    assert TrainReport.from_content(large.content).status is Status.TRAINED
    assert small_plan == large_plan and len(small_plan) == 1
    plan, _ = small_plan[0]
    assert (plan.sample_rate, plan.steps, plan.expected_batch_size) == (1 / 8, 8, 32)
    assert dict(small.content["report"]) == dict(large.content["report"])
    assert TrainReport.from_content(small.content).planning_records == 256
    assert set(small.content.keys()) == set(large.content.keys())


def test_attack3_a_device_without_planning_records_refuses_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 3: without a public count a device has nothing safe to plan from. It
    refuses every record-level run, naming the policy key, before it trains or spends
    anything, and alike for N = 256 and N = 257."""
    replies = {}
    for n in (256, 257):
        reply, trained = _edge_device(
            tmp_path, n, monkeypatch, **{"planning-records": None}
        )
        report = TrainReport.from_content(reply.content)
        assert report.status is Status.POLICY_REFUSED and not trained
        assert "'planning-records'" in str(report.reason)
        assert "docs/edge-clients.md" in str(report.reason)
        assert str(n) not in str(report.reason)
        assert not (tmp_path / f"state{n}" / LEDGER_FILE).exists()
        replies[n] = dict(reply.content["report"])
    assert replies[256] == replies[257]


def test_a_device_checks_delta_against_its_planning_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """δ ≥ 1/planning-records is refused whatever N; the reply names no count, and a
    device holding more records than it plans from is told so in its own log."""
    with caplog.at_level(logging.WARNING, logger="privfed.client"):
        reply, trained = _edge_device(
            tmp_path, 200, monkeypatch, **{"planning-records": 257}
        )
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED and not trained
    assert "is not below 1/N" in str(report.reason)
    assert not set(re.findall(r"\d+", str(report.reason))) & {"200", "257"}
    assert "N = 257 records this node plans from (it holds 200)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="privfed.client"):
        reply, _ = _edge_device(tmp_path / "more", 300, monkeypatch,
                                **{"planning-records": 256})  # fmt: skip
    assert TrainReport.from_content(reply.content).status is Status.TRAINED
    assert "holds 300 training records, more than the 256" in caplog.text


def test_batch_size_one_is_refused_for_private_runs() -> None:
    """B = 1 gives an expected Poisson batch int(N·(1/N)) that rounds to 0 for many N."""
    with pytest.raises(ConfigError, match="'batch-size'.*>= 2"):
        RunConfig(batch_size=1)
    RunConfig(batch_size=1, privacy_mode="none", target_epsilon=0.0)  # no noise to scale


def test_direct_mode_divides_like_opacus() -> None:
    """N = 27,000, B = 32: Opacus accounts q = 1/843 and divides by int(N/843) = 32."""
    plan = plan_dp_sgd_round(27_000, 32, 1)
    assert plan.sample_rate == 1 / 843 and plan.sampler_rate == 1 / 844
    assert plan.expected_batch_size == int(27_000 * (1 / 843)) == 32


# --- found by an adversarial review ------------------------------------------------------


def test_a_device_error_reply_names_no_record_count(tmp_path: Path) -> None:
    """A run for another dataset fails the data checks; the reply names no count.

    The loader's message says "shape (321, 8, 8)"; the reply names the file, the
    problem and the rule (28x28 images), and nothing that follows from the records.
    """
    data = digits_npz(tmp_path / "d.npz", 321)
    state = write_policy(tmp_path / "state")
    cfg = RunConfig(num_rounds=3, task="fashion-mnist", target_epsilon=3.0)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    ctx = device_context(cfg, data, state)
    reply = client_app.train(train_message(initial, 1), ctx)
    assert not reply.has_error()  # Flower would have sent the exception's text
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.DATA_ERROR
    assert "'d.npz': images are not shaped" in str(report.reason)
    evaluation = EvaluateReport.from_content(
        client_app.evaluate(evaluate_message(initial, 1), ctx).content
    )
    assert evaluation.status is Status.DATA_ERROR
    for reason in (str(report.reason), str(evaluation.reason)):
        assert set(re.findall(r"\d+", reason)) <= {"0", "1", "28", "255", "784"}, reason
        assert str(tmp_path) not in reason


def test_concurrent_rounds_cannot_overspend_the_ledger(tmp_path: Path) -> None:
    """A second ClientApp process waits for the ledger lock and sees the first's spend."""
    data, state = _exhausted_device(tmp_path)
    spent = (state / LEDGER_FILE).read_bytes()
    (state / LEDGER_FILE).write_text(PrivacyLedger("rdp", 1e-5).to_json())  # fresh
    cfg = RunConfig(num_rounds=3, target_epsilon=2.0)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    replies: list[Message] = []
    node = NodeSettings(data_path=str(data), state_dir=str(state))
    with ledger_lock(node):  # another round is between its read and its store
        worker = threading.Thread(
            target=lambda: replies.append(
                client_app.train(
                    train_message(initial, 1), device_context(cfg, data, state)
                )
            )
        )
        worker.start()
        time.sleep(1.0)
        assert not replies  # waiting for the lock, not training on a stale ledger
        (state / LEDGER_FILE).write_bytes(spent)  # … which stores an exhausted ledger
    worker.join(timeout=60)
    assert TrainReport.from_content(replies[0].content).status is Status.BUDGET_EXHAUSTED
    assert (state / LEDGER_FILE).read_bytes() == spent


def test_a_device_plans_from_its_public_record_count(tmp_path: Path) -> None:
    """planning-records fixes q and steps whatever N is; without it there is no plan."""
    policy = PrivacyPolicy(epsilon_budget=3.0, delta=1e-5, planning_records=1000)
    assert policy.records_for_planning(321) == policy.records_for_planning(900) == 1000
    without = PrivacyPolicy(epsilon_budget=3.0, delta=1e-5)
    for n in (1, 256, 257, 512):
        with pytest.raises(PolicyError, match="'planning-records'"):
            without.records_for_planning(n)
    assert PrivacyPolicy.for_simulation(RunConfig()).records_for_planning(321) == 321
    data = digits_npz(tmp_path / "d.npz", 300)
    state = write_policy(tmp_path / "state", **{"planning-records": 1000})
    cfg = RunConfig(num_rounds=3, target_epsilon=3.0, epsilon_budget=3.0)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(initial, 1), device_context(cfg, data, state))
    ledger = TrainReport.from_content(reply.content).ledger
    assert ledger is not None and ledger.history()[0][1:] == (1 / 32, 32)  # ⌈1000/32⌉


def test_the_policy_fixes_the_accountant(tmp_path: Path) -> None:
    """A run cannot switch to the accountant under which a spent budget looks unspent."""
    data, state = _exhausted_device(tmp_path)
    cfg = RunConfig(num_rounds=3, target_epsilon=2.0, accountant="prv")
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    report = TrainReport.from_content(
        client_app.train(
            train_message(initial, 1), device_context(cfg, data, state)
        ).content
    )
    assert report.status is Status.POLICY_REFUSED
    assert "run config key 'accountant'" in str(report.reason)


def test_a_device_refuses_to_evaluate_on_a_handful_of_records(tmp_path: Path) -> None:
    """An opted-in device still never reports metrics of fewer than 50 test records."""
    data = digits_npz(tmp_path / "d.npz", 300)
    state = write_policy(tmp_path / "state", **{"federated-evaluation": True})
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    for fraction, expected in ((0.01, Status.POLICY_REFUSED), (0.2, Status.SCORED)):
        cfg = RunConfig(num_rounds=3, fraction_evaluate=1.0, local_test_fraction=fraction)
        reply = client_app.evaluate(
            evaluate_message(initial, 1), device_context(cfg, data, state)
        )
        assert EvaluateReport.from_content(reply.content).status is expected


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_opacus_modes_take_noise_only_steps_on_empty_batches(mode: str) -> None:
    """q = 1/10 on 10 records: most Poisson batches are empty, and each still steps."""
    model = build_model("digits", seed=0)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    cfg = RunConfig(batch_size=2, local_epochs=3, grad_sample_mode=mode)
    plan = RoundPlan(sample_rate=0.1, sampler_rate=0.1, steps=30, expected_batch_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = dp_training.train_private(model, x, y, cfg, plan, 1.0, round_generator(2))
    assert outcome.history == ((1.0, 0.1, 30),)
    assert all(
        not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
    )


def _reply_with_ledger(ledger_json: str) -> Message:
    content = RecordDict(
        {
            "report": ConfigRecord(
                {"status": "budget-exhausted", "partition-id": 0, "ledger": ledger_json}
            )
        }  # fmt: skip
    )
    return Message(content=content, metadata=train_message(ArrayRecord(), 1).metadata)


@pytest.mark.parametrize(
    "ledger_json",
    [
        "[" * 100_000,
        PrivacyLedger("rdp", 1e-5)
        .to_json()
        .replace("[]", "[[1.0, 0.1, " + "9" * 400 + "]]", 1),
        PrivacyLedger("rdp", 1e-5).to_json().replace("[]", "[[1e-300, 0.1, 10]]", 1),
        PrivacyLedger("prv", 1e-5).to_json().replace("[]", "[[0.001, 0.5, 10]]", 1),
        PrivacyLedger("prv", 1e-5)
        .to_json()
        .replace("[]", "[[1.0, 0.5, 10000000000000]]", 1),
        " " * 9_000_000,
    ],
)
def test_a_malformed_ledger_is_an_error_outcome_not_a_crash(ledger_json: str) -> None:
    """The server records a reply whose ledger it cannot account as an error."""
    outcome = outcome_from_reply(_reply_with_ledger(ledger_json))
    assert outcome.status is Status.REJECTED
    assert outcome.to_dict()["epsilon"] is None


def test_evaluation_replies_with_bad_counts_are_dropped() -> None:
    """num-examples must be >= 1: a negative count cannot skew or crash the average."""
    strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    replies = []
    for count in (5, -5):
        values = {"status": "scored", "partition-id": 0, "num-examples": count,
                  **{f"eval-{m}": 0.5 for m in EVAL_METRICS}}  # fmt: skip
        content = RecordDict({"report": ConfigRecord(values)})
        replies.append(
            Message(content=content, metadata=train_message(ArrayRecord(), 1).metadata)
        )
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["num-examples"] == 5 and metrics["nodes"] == 1


def test_make_deploy_writes_a_policy_only_where_none_exists(tmp_path: Path) -> None:
    """The local deployment gives new nodes the run's settings and keeps an owner's file."""
    from simulations.deploy import write_node_policy

    cfg = RunConfig(target_epsilon=3.0)
    assert write_node_policy(tmp_path / "new", cfg, 144) == "written"
    written = PrivacyPolicy.from_file(tmp_path / "new" / POLICY_FILE)
    assert (written.epsilon_budget, written.delta, written.release_ledger) == (
        3.0,
        1e-5,
        True,
    )
    assert not written.allow_non_private and not written.allow_reproducible_noise
    assert written.planning_records == 144 and not written.exact_records
    # A kept policy a sample run would refuse stops the launch, naming the key.
    bare = write_policy(tmp_path / "bare", **{"planning-records": None})
    with pytest.raises(PolicyError, match="'planning-records'"):
        write_node_policy(bare, cfg)
    assert write_node_policy(bare, RunConfig(privacy_mode="client")) == "kept"
    owner = write_policy(tmp_path / "owned", **{"epsilon-budget": 1.0})
    before = (owner / POLICY_FILE).read_bytes()
    assert write_node_policy(owner, cfg) == "kept"
    assert (owner / POLICY_FILE).read_bytes() == before
    (owner / POLICY_FILE).write_text("delta = 1e-5\n")
    with pytest.raises(PolicyError, match="'epsilon-budget'"):
        write_node_policy(owner, cfg)  # a broken policy stops the launch, not a round
