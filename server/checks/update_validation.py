"""Update validation: every trained reply is checked before anything is aggregated.

The server checks each ``trained`` reply against the global model it sent that
round and against what the same node reported before in this run:

- arrays: the same names, shapes and dtypes as the model, all values finite; a
  compressed reply (``update-compression``) is decoded against the global model
  first, and one that does not decode is rejected with the codec's reason;
- norm: ``‖reply − global‖`` (or a client-level change's ``‖update‖``) within the
  bound the privacy mode implies: the round's clip norm C for client-level DP (plus
  the encoding's error bound for a compressed change), run key ``max-update-norm``
  for ``sample`` and ``none``; the norm is the decoded update's;
- claims: the reply's kind matches the run's privacy mode and its encoding the run's
  ``update-compression``; a released ledger uses
  the run's accountant, records this round, and extends the node's previous ledger
  (same δ, steps and ε never lower); with sample-level DP its last round's q and
  steps are the ones its ``planning-records`` (the aggregation weight) give. A
  ``budget-exhausted`` reply's ledger is held to the same extension rule.

A reply that fails becomes a :attr:`~common.wire.reply_fields.Status.REJECTED` outcome whose
reason says which check failed; it is never aggregated and its ledger is not
recorded. The ledger witness (:mod:`server.checks.ledger_witness`) checks something
else: the node's hash-chain fingerprint against what this server saw across runs.
"""

from __future__ import annotations

import dataclasses
import math
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore import log

from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.update_clipping import UpdateError, update_norm
from common.wire.records import record_of
from common.wire.reply_fields import Status, arrays_key
from common.wire.update_codec import CodecError, UpdateCodec, apply_change
from server.results.client_outcomes import ClientOutcome

EPSILON_SLACK = 1e-9  # relative: ε recomputed from the same history may differ in ulps


class UpdateRejected(ValueError):
    """A trained reply fails a check; the message is the reason recorded."""


def _norm(arrays: list[np.ndarray]) -> float:
    try:
        return update_norm(arrays)
    except UpdateError as exc:
        raise UpdateRejected(str(exc)) from None


def checked_arrays(
    record: ArrayRecord, keys: list[str], reference: list[np.ndarray]
) -> list[np.ndarray]:
    """``record``'s arrays if their names, shapes and dtypes equal the model's (``keys``,
    ``reference``) and all values are finite."""
    got_keys = list(record.keys())
    if got_keys != keys:
        missing = sorted(set(keys) - set(got_keys))
        extra = sorted(set(got_keys) - set(keys))
        detail = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"extra {extra}" if extra else "",
            )
            if part
        )
        raise UpdateRejected(
            f"arrays {got_keys} do not match the model's {keys} ({detail or 'order'})"
        )
    try:
        arrays = record.to_numpy_ndarrays()
    except (ValueError, TypeError) as exc:  # e.g. bytes that are not an array
        raise UpdateRejected(f"arrays do not decode: {exc}") from None
    for key, got, want in zip(keys, arrays, reference, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise UpdateRejected(
                f"{key!r} is {got.dtype}{list(got.shape)}, "
                f"not {want.dtype}{list(want.shape)}"
            )
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise UpdateRejected(f"{key!r} holds NaN or infinite values")
    return arrays


def decoded_arrays(
    record: ArrayRecord, reference: list[np.ndarray], codec: UpdateCodec, change: bool
) -> tuple[list[np.ndarray], float]:
    """A compressed reply's arrays in the model's dtypes — the weights ``reference +
    change``, or the ``change`` itself (client-level) — and the codec's bound on the
    L2 error of the decoded change."""
    try:
        decoded = codec.decode(record, reference)
    except CodecError as exc:
        raise UpdateRejected(f"the {codec.name} change: {exc}") from None
    if change:
        with np.errstate(over="ignore"):  # past the dtype's range: inf, checked below
            arrays = [
                d.astype(r.dtype) for d, r in zip(decoded.arrays, reference, strict=True)
            ]
    else:
        arrays = apply_change(reference, decoded.arrays)
    if not all(np.isfinite(a).all() for a in arrays):
        raise UpdateRejected(f"the {codec.name} change decodes past the model's dtype")
    return arrays, decoded.error_norm


class UpdateValidator:
    """Checks every trained reply of a run; remembers each node's accepted ledger."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.accepted: dict[int, PrivacyLedger] = {}  # node id -> its last accepted ledger
        self._decoded: tuple[ArrayRecord, list[str], list[np.ndarray]] | None = None

    def validate(
        self,
        server_round: int,
        reply: Message,
        outcome: ClientOutcome,
        reference: ArrayRecord,
        clip_norm: float | None = None,
    ) -> tuple[ClientOutcome, list[np.ndarray] | None]:
        """The outcome (``rejected`` with a reason if a check fails) and the reply's
        arrays. A ``budget-exhausted`` reply's ledger is checked against the node's
        previous one too (its ε is recorded); other replies pass through unchanged."""
        if outcome.status is Status.BUDGET_EXHAUSTED and outcome.ledger is not None:
            try:
                self._check_ledger(outcome.ledger, outcome.node_id, grew=False)
            except UpdateRejected as exc:
                return self._rejected(server_round, outcome, f"budget refusal: {exc}"), None
            self.accepted[outcome.node_id] = outcome.ledger
            return outcome, None
        if outcome.status is not Status.TRAINED:
            return outcome, None
        client_level = self.cfg.is_client_level
        try:
            self._check_claims(server_round, outcome)
            keys, model = self._model(reference)
            key = arrays_key(client_level, outcome.compressed)
            record = record_of(reply.content, key, ArrayRecord)
            if record is None:  # the reply's parser requires it: never reached
                raise UpdateRejected(f"the reply has no {key!r} arrays")
            slack = 0.0
            if outcome.compressed:
                codec = UpdateCodec(self.cfg.update_compression)
                arrays, slack = decoded_arrays(record, model, codec, client_level)
            else:
                arrays = checked_arrays(record, keys, model)
            self._check_norm(arrays, model, clip_norm, slack)
        except UpdateRejected as exc:
            scope = "client-level update" if client_level else "update"
            return self._rejected(server_round, outcome, f"{scope} rejected: {exc}"), None
        if outcome.ledger is not None:
            self.accepted[outcome.node_id] = outcome.ledger
        return outcome, arrays

    def validate_claims(self, server_round: int, outcome: ClientOutcome) -> ClientOutcome:
        """A secure-aggregation upload's report: kind and released ledger (its masked
        vector is checked where it is unmasked, and its norm cannot be: that is the
        point of masking)."""
        if outcome.status is not Status.TRAINED:
            return self.validate(server_round, None, outcome, None)[0]  # type: ignore[arg-type]
        try:
            self._check_claims(server_round, outcome)
        except UpdateRejected as exc:
            return self._rejected(server_round, outcome, f"masked upload rejected: {exc}")
        if outcome.ledger is not None:
            self.accepted[outcome.node_id] = outcome.ledger
        return outcome

    def _rejected(
        self, server_round: int, outcome: ClientOutcome, reason: str
    ) -> ClientOutcome:
        log(WARNING, "round %d: node %d (partition %s): %s", server_round,
            outcome.node_id, outcome.partition_id, reason)  # fmt: skip
        return dataclasses.replace(outcome, status=Status.REJECTED, reason=reason)

    def _model(self, reference: ArrayRecord) -> tuple[list[str], list[np.ndarray]]:
        """The round's global model decoded once, not once per reply."""
        if self._decoded is None or self._decoded[0] is not reference:
            self._decoded = (
                reference,
                list(reference.keys()),
                reference.to_numpy_ndarrays(),
            )
        return self._decoded[1], self._decoded[2]

    # -- checks -------------------------------------------------------------------
    def _check_norm(
        self,
        arrays: list[np.ndarray],
        model: list[np.ndarray],
        clip_norm: float | None,
        slack: float = 0.0,
    ) -> None:
        """``slack``: the encoding's error bound (0 for float32), for client-level."""
        if self.cfg.is_client_level:
            if clip_norm is None:
                raise RuntimeError("a client-level round validates against its clip norm")
            norm = _norm(arrays)
            # An honest client clips to C·(1 − 1e-6) before sending (and encoding).
            if norm > clip_norm + slack:
                encoding = f" + {slack:.6g} (the encoding's error bound)" if slack else ""
                raise UpdateRejected(
                    f"update norm {norm:.6g} > this round's clip norm {clip_norm:.6g}"
                    f"{encoding} (an honest client clips before sending)"
                )
            return
        bound = self.cfg.max_update_norm
        if bound == 0:
            return
        change = [
            got.astype(np.float64) - want for got, want in zip(arrays, model, strict=True)
        ]
        norm = _norm(change)
        if norm > bound:
            raise UpdateRejected(
                f"update norm ‖reply − global‖ = {norm:.6g} > {bound:g} "
                "(run config key 'max-update-norm')"
            )

    def _check_claims(self, server_round: int, outcome: ClientOutcome) -> None:
        cfg = self.cfg
        mode = cfg.privacy_mode
        sent = (
            "a masked upload" if outcome.masked
            else "a client-level update" if outcome.below_clip is not None
            else "weights"
        )  # fmt: skip
        want = (
            "a masked upload" if cfg.secure_aggregation
            else "a client-level update" if cfg.is_client_level
            else "weights"
        )  # fmt: skip
        if sent != want:
            raise UpdateRejected(f"privacy-mode {mode!r} needs {want}, got {sent}")
        encoding = cfg.update_compression
        if not outcome.masked and outcome.compressed != (encoding != "none"):
            got = "a compressed update" if outcome.compressed else "float32 arrays"
            raise UpdateRejected(
                f"update-compression {encoding!r} needs "
                f"{'float32 arrays' if encoding == 'none' else 'a compressed update'}, "
                f"got {got}"
            )
        if cfg.is_private and outcome.num_examples is not None:
            raise UpdateRejected(
                "a non-private reply (num-examples) in a privacy-mode 'sample' run"
            )
        if mode == "none" and outcome.num_examples is None:
            raise UpdateRejected("privacy-mode 'none' weights replies by num-examples")
        ledger = outcome.ledger
        if ledger is None:
            return  # the node's policy keeps it; no ε is recorded for it
        if not ledger.rounds or ledger.rounds[-1] != server_round:
            last = ledger.rounds[-1] if ledger.rounds else None
            raise UpdateRejected(
                f"the released ledger does not record round {server_round} "
                f"(its last round is {last})"
            )
        if cfg.is_private:
            self._check_plan(outcome)
        self._check_ledger(ledger, outcome.node_id, grew=True)

    def _check_ledger(self, ledger: PrivacyLedger, node_id: int, grew: bool) -> None:
        """The run's accountant, and an extension of the node's last accepted ledger
        (with one more round or more if it ``grew``: it trained since)."""
        if ledger.accountant != self.cfg.accountant:
            raise UpdateRejected(
                f"the ledger's accountant is {ledger.accountant!r}, the run's is "
                f"{self.cfg.accountant!r} (run config key 'accountant')"
            )
        previous = self.accepted.get(node_id)
        if previous is not None:
            _check_extends(previous, ledger, grew)

    def _check_plan(self, outcome: ClientOutcome) -> None:
        """The last ledger round is the one ``planning-records`` (the weight) plans."""
        assert outcome.ledger is not None and outcome.weight is not None
        cfg = self.cfg
        last = outcome.ledger.entries[-1]
        try:
            plan = plan_dp_sgd_round(outcome.weight, cfg.batch_size, cfg.local_epochs)
        except ValueError as exc:
            raise UpdateRejected(f"planning-records {outcome.weight}: {exc}") from None
        keys = f"batch-size {cfg.batch_size}, local-epochs {cfg.local_epochs}"
        if last.noise_multiplier == 0 or not math.isclose(
            last.sample_rate, plan.sample_rate, rel_tol=1e-9
        ):
            raise UpdateRejected(
                f"planning-records {outcome.weight} gives q = {plan.sample_rate:.6g} "
                f"({keys}), but the released ledger's last round has σ = "
                f"{last.noise_multiplier:g}, q = {last.sample_rate:.6g}"
            )
        if last.steps < plan.steps:
            raise UpdateRejected(
                f"planning-records {outcome.weight} gives {plan.steps} steps a round "
                f"({keys}), but the released ledger's last entry has {last.steps}"
            )


def _check_extends(previous: PrivacyLedger, ledger: PrivacyLedger, grew: bool) -> None:
    """The node's ledger now extends the one it reported before: same δ, more rounds
    (as many if it did not train since), no fewer steps, no lower ε."""
    if ledger.delta != previous.delta:
        raise UpdateRejected(
            f"the ledger's δ changed from {previous.delta:g} to {ledger.delta:g}"
        )
    if len(ledger.rounds) < len(previous.rounds) + int(grew):
        more = "more than" if grew else "at least"
        raise UpdateRejected(
            f"the ledger records {len(ledger.rounds)} rounds, not {more} the "
            f"{len(previous.rounds)} it reported before"
        )
    if ledger.total_steps < previous.total_steps:
        raise UpdateRejected(
            f"the ledger's steps went back from {previous.total_steps} to "
            f"{ledger.total_steps}"
        )
    before, now = previous.epsilon(), ledger.epsilon()
    if now < before * (1 - EPSILON_SLACK):
        raise UpdateRejected(
            f"cumulative ε decreased from {before:.6g} to {now:.6g} (recomputed from "
            "the ledgers it released)"
        )
