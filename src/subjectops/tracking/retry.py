"""The one retry policy for MLflow calls (`tracking.retries` tries, exponential backoff from
`tracking.backoff_seconds`), shared by the tracker, registration and every other MLflow caller."""

from __future__ import annotations

import time
from typing import Callable

import tenacity

from subjectops.config import TrackingCfg
from subjectops.errors import SubjectopsError
from subjectops.tracking.client import describe_error, is_client_error


def retry_policy(cfg: TrackingCfg, what: str, uri: str | None, echo: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """The one retry policy for MLflow calls: `tracking.retries` tries, waits of `tracking.backoff_seconds`
    doubling after each failure, no retry of what retrying cannot fix (our own errors, 4xx answers)."""

    def retryable(exc: BaseException) -> bool:
        return not isinstance(exc, SubjectopsError) and not is_client_error(exc)

    def announce(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        echo(f"{what} failed ({describe_error(exc, uri)}); retry {state.attempt_number}/{cfg.retries - 1} "
             f"in {state.next_action.sleep:g} s")

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(cfg.retries),
                             wait=tenacity.wait_exponential(multiplier=cfg.backoff_seconds, exp_base=2),
                             retry=tenacity.retry_if_exception(retryable), before_sleep=announce, sleep=sleep,
                             reraise=True)
